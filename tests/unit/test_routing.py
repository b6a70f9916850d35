"""Table-driven tests for routing by task size (pure: no servers needed)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from service.policy.routing import (
    FEATURE_WEIGHTS,
    KINDS,
    SUB_QUESTION_WEIGHT,
    ModelChoice,
    Route,
    RoutingPolicy,
    TaskFeatures,
    UnknownModelError,
    choose_route,
    parse_model_list,
    task_features,
)

HAIKU = ModelChoice("anthropic", "claude-haiku-4-5")
SONNET = ModelChoice("anthropic", "claude-sonnet-4-6")
MINI = ModelChoice("openai", "gpt-4o-mini")
GPT4O = ModelChoice("openai", "gpt-4o")
EXTRACTIVE = ModelChoice("extractive", "extractive")

BOTH = RoutingPolicy(small=(HAIKU, MINI), large=(SONNET, GPT4O))
SIMPLE = "What is HNSW?"


def auto(
    question: str = SIMPLE, prompt_tokens: int = 400, max_tokens: int = 512, policy: RoutingPolicy = BOTH
) -> Route:
    return choose_route("auto", question=question, prompt_tokens=prompt_tokens, max_tokens=max_tokens, policy=policy)


def config(
    *,
    anthropic: bool = False,
    openai: bool = False,
    openai_compatible: bool = False,
    models_small: str | None = None,
    models_large: str | None = None,
    **thresholds: int,
) -> RoutingPolicy:
    return RoutingPolicy.from_config(
        anthropic=anthropic,
        openai=openai,
        openai_compatible=openai_compatible,
        models_small=models_small,
        models_large=models_large,
        **thresholds,
    )


# --- task features -----------------------------------------------------------------

FEATURE_CASES: list[tuple[str, int, tuple[str, ...]]] = [
    # question, sub-questions, kinds
    ("What is HNSW?", 1, ()),
    ("what is hnsw", 1, ()),
    ("caching", 1, ()),
    ("What is 3.14?", 1, ()),
    ("What is e.g. a chunk?", 1, ()),
    ("What is the mailing list address?", 1, ()),
    ("select a plan from the list", 1, ()),
    ("The index, which is HNSW, is fast?", 1, ()),
    ("What is X? What is Y?", 2, ()),
    ("What is X? What is Y? What is Z?", 3, ()),
    ("What is X?? Really?", 2, ()),
    ("What is X; what is Y", 2, ()),
    ("What is HNSW and how does it differ from IVFFlat?", 2, ("compare",)),
    ("What is X, and how is it built, and why?", 3, ("why",)),
    ("Is it fast? And why?", 2, ("why",)),
    ("And what is X?", 1, ()),
    ("How do cats and dogs differ?", 1, ("compare",)),
    ("Compare pgvector and FAISS.", 1, ("compare",)),
    ("pgvector vs FAISS", 1, ("compare",)),
    ("pgvector versus FAISS for small corpora", 1, ("compare",)),
    ("What is the difference between HNSW and IVFFlat?", 1, ("compare",)),
    ("What are the pros and cons of caching?", 1, ("compare",)),
    ("Explain the cache key.", 1, ("explain",)),
    ("Describe the ingest pipeline", 1, ("explain",)),
    ("How does HNSW work?", 1, ("explain",)),
    ("Tell me about caching", 1, ("explain",)),
    ("Why is the sky blue?", 1, ("why",)),
    ("What causes cache misses?", 1, ("why",)),
    ("How come the index is slow?", 1, ("why",)),
    ("How do I install pgvector?", 1, ("how-to",)),
    ("how to rotate API keys", 1, ("how-to",)),
    ("What are the steps to restore a backup?", 1, ("how-to", "list")),
    ("Give me step-by-step instructions for setup", 1, ("how-to",)),
    ("What does `SELECT 1` return?", 1, ("code",)),
    ("def foo(): pass -- why does this fail?", 1, ("why", "code")),
    ("Why does x => x + 1 not compile?", 1, ("why", "code")),
    ("What does foo(); do?", 1, ("code",)),
    ("Is {} truthy?", 1, ("code",)),
    ("SELECT id FROM docs is slow", 1, ("code",)),
    ("Write a function that parses dates", 1, ("code",)),
    ("How do I parse JSON in Python?", 1, ("how-to", "code")),
    ("What is a ternary like ```a ? b : c``` for?", 1, ("code",)),
    ("What is `x?.y` and `a ?? b`?", 1, ("code",)),
    ("List all the supported file formats.", 1, ("list",)),
    ("Give me 5 tips for faster ingest", 1, ("list",)),
    ("What are the types of index?", 1, ("list",)),
    (
        "Explain how to configure Redis. What are the pros and cons?",
        2,
        ("compare", "explain", "how-to"),
    ),
    ("", 0, ()),
    ("   ", 0, ()),
]


@pytest.mark.parametrize(("question", "sub_questions", "kinds"), FEATURE_CASES)
def test_task_features(question: str, sub_questions: int, kinds: tuple[str, ...]) -> None:
    features = task_features(question)
    assert (features.sub_questions, features.kinds) == (sub_questions, kinds)
    expected_score = SUB_QUESTION_WEIGHT * max(sub_questions - 1, 0) + sum(FEATURE_WEIGHTS[k] for k in kinds)
    assert features.score == expected_score


def test_feature_kinds_are_ordered_and_known() -> None:
    features = task_features("Compare X vs Y, explain why, and how do I list all of it in Python?")
    assert set(features.kinds) <= set(KINDS)
    assert list(features.kinds) == sorted(features.kinds, key=KINDS.index)
    assert set(FEATURE_WEIGHTS) == set(KINDS)


def test_feature_weights_documented_examples() -> None:
    # A comparison or a code question alone reaches the default threshold; one "why" does not.
    assert task_features("Compare A and B").score == 2
    assert task_features("Why is it slow?").score == 1
    assert task_features("What is X and how does it differ from Y?").score == 3


def test_describe() -> None:
    assert TaskFeatures(1, (), 0).describe() == "simple question"
    assert TaskFeatures(2, ("compare",), 3).describe() == "2 sub-questions, compare"
    assert TaskFeatures(1, ("why", "code"), 3).describe() == "why, code"


# --- auto decisions --------------------------------------------------------------------

AUTO_CASES: list[tuple[str, str, int, int, str, tuple[str, ...]]] = [
    # name, question, prompt_tokens, max_tokens, tier, fragments the reason must contain
    ("simple", SIMPLE, 412, 512, "small", ("412 prompt tokens", "max_tokens 512", "simple question")),
    ("prompt at boundary", SIMPLE, 3000, 512, "large", ("3000 prompt tokens >= 3000",)),
    ("prompt below boundary", SIMPLE, 2999, 512, "small", ("2999 prompt tokens",)),
    ("prompt far above", SIMPLE, 3412, 512, "large", ("3412 prompt tokens >= 3000",)),
    ("max_tokens at boundary", SIMPLE, 400, 1024, "large", ("max_tokens 1024 >= 1024",)),
    ("max_tokens below boundary", SIMPLE, 400, 1023, "small", ("max_tokens 1023",)),
    ("compare", "Compare HNSW and IVFFlat", 400, 512, "large", ("compare", "score 2 >= 2")),
    ("code", "What does `x => x` mean?", 400, 512, "large", ("code", "score 2 >= 2")),
    (
        "two sub-questions and compare",
        "What is HNSW and how does it differ from IVFFlat?",
        400,
        512,
        "large",
        ("2 sub-questions, compare (score 3 >= 2)",),
    ),
    ("why alone", "Why is the cache cold?", 400, 512, "small", ("why (score 1 < 2)",)),
    ("explain + why", "Explain why the cache is cold", 400, 512, "large", ("explain, why (score 2 >= 2)",)),
    ("two sub-questions alone", "What is X? What is Y?", 400, 512, "small", ("2 sub-questions (score 1 < 2)",)),
    ("three sub-questions", "What is X? What is Y? What is Z?", 400, 512, "large", ("3 sub-questions",)),
    (
        "all triggers",
        "Compare X vs Y",
        5000,
        2048,
        "large",
        ("5000 prompt tokens >= 3000", "max_tokens 2048 >= 1024", "compare (score 2 >= 2)"),
    ),
    ("prompt + max_tokens", SIMPLE, 3001, 4096, "large", ("3001 prompt tokens >= 3000", "max_tokens 4096 >= 1024")),
]


@pytest.mark.parametrize(
    ("question", "prompt_tokens", "max_tokens", "tier", "fragments"),
    [case[1:] for case in AUTO_CASES],
    ids=[case[0] for case in AUTO_CASES],
)
def test_auto(question: str, prompt_tokens: int, max_tokens: int, tier: str, fragments: tuple[str, ...]) -> None:
    route = auto(question, prompt_tokens, max_tokens)
    assert route.tier == tier
    assert route.reason.startswith("auto: ")
    for fragment in fragments:
        assert fragment in route.reason
    expected = BOTH.small[0] if tier == "small" else BOTH.large[0]
    assert (route.provider, route.model) == (expected.provider, expected.model)


def test_auto_reason_names_only_the_triggers_that_fired() -> None:
    reason = auto(SIMPLE, prompt_tokens=3500, max_tokens=100).reason
    assert reason == "auto: 3500 prompt tokens >= 3000"
    reason = auto(SIMPLE, prompt_tokens=10, max_tokens=2000).reason
    assert reason == "auto: max_tokens 2000 >= 1024"
    assert auto(SIMPLE, 412, 512).reason == "auto: 412 prompt tokens, max_tokens 512, simple question"


@pytest.mark.parametrize(
    ("field", "value", "kwargs", "tier"),
    [
        ("large_prompt_tokens", 500, {"prompt_tokens": 500}, "large"),
        ("large_prompt_tokens", 500, {"prompt_tokens": 499}, "small"),
        ("large_max_tokens", 256, {"max_tokens": 256}, "large"),
        ("large_max_tokens", 256, {"max_tokens": 255}, "small"),
        ("large_feature_score", 1, {"question": "Why is it slow?"}, "large"),
        ("large_feature_score", 3, {"question": "Compare A and B"}, "small"),
        ("large_feature_score", 3, {"question": "What is A and how does it compare to B?"}, "large"),
    ],
)
def test_thresholds_come_from_the_policy(field: str, value: int, kwargs: dict[str, Any], tier: str) -> None:
    changes: dict[str, Any] = {field: value}
    policy = dataclasses.replace(BOTH, **changes)
    args: dict[str, Any] = {"question": SIMPLE, "prompt_tokens": 100, "max_tokens": 100, **kwargs}
    route = choose_route("auto", policy=policy, **args)
    assert route.tier == tier


def test_decide_is_deterministic() -> None:
    question = "What is HNSW and how does it differ from IVFFlat? Explain why."
    routes = {auto(question, 1234, 700) for _ in range(5)}
    assert len(routes) == 1


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        auto(SIMPLE, prompt_tokens=-1)


# --- explicit tiers and models -----------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "tier", "model"),
    [
        ("small", "small", "claude-haiku-4-5"),
        ("large", "large", "claude-sonnet-4-6"),
        ("LARGE", "large", "claude-sonnet-4-6"),
        (" small ", "small", "claude-haiku-4-5"),
    ],
)
def test_explicit_tier_overrides_size(requested: str, tier: str, model: str) -> None:
    # The measured size would say the opposite: the request wins.
    size = {"prompt_tokens": 10, "max_tokens": 10} if tier == "large" else {"prompt_tokens": 9000, "max_tokens": 9000}
    route = choose_route(requested, question="Compare A vs B" if tier == "small" else SIMPLE, policy=BOTH, **size)
    assert (route.tier, route.model) == (tier, model)
    assert route.reason == f"requested tier {tier}"


@pytest.mark.parametrize(
    ("requested", "tier", "provider", "model"),
    [
        ("gpt-4o", "large", "openai", "gpt-4o"),
        ("gpt-4o-mini", "small", "openai", "gpt-4o-mini"),
        ("claude-sonnet-4-6", "large", "anthropic", "claude-sonnet-4-6"),
        ("anthropic:claude-haiku-4-5", "small", "anthropic", "claude-haiku-4-5"),
    ],
)
def test_explicit_model_in_allow_list(requested: str, tier: str, provider: str, model: str) -> None:
    route = choose_route(requested, question="Compare A vs B", prompt_tokens=9000, max_tokens=9000, policy=BOTH)
    assert (route.tier, route.provider, route.model) == (tier, provider, model)
    assert model in route.reason and "requested model" in route.reason
    assert route.choice not in route.fallbacks


@pytest.mark.parametrize("requested", ["gpt-5", "claude-opus-4", "extractive", "openai:claude-haiku-4-5", "", "Auto!"])
def test_explicit_model_outside_allow_list(requested: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        choose_route(requested, question=SIMPLE, prompt_tokens=10, max_tokens=10, policy=BOTH)
    assert isinstance(info.value, ValueError)
    assert "gpt-4o" in str(info.value)  # the message lists what is allowed


def test_extractive_is_requestable_when_it_is_the_only_model() -> None:
    route = choose_route("extractive", question=SIMPLE, prompt_tokens=1, max_tokens=1, policy=config())
    assert (route.provider, route.model, route.fallbacks) == ("extractive", "extractive", ())


def test_unknown_model_error_message_is_bounded() -> None:
    with pytest.raises(UnknownModelError) as info:
        choose_route("x" * 5000, question=SIMPLE, prompt_tokens=1, max_tokens=1, policy=BOTH)
    assert len(str(info.value)) < 300


# --- from_config ------------------------------------------------------------------------

CONFIG_CASES: list[tuple[str, dict[str, Any], tuple[ModelChoice, ...], tuple[ModelChoice, ...]]] = [
    ("none", {}, (EXTRACTIVE,), (EXTRACTIVE,)),
    ("anthropic only", {"anthropic": True}, (HAIKU,), (SONNET,)),
    ("openai only", {"openai": True}, (MINI,), (GPT4O,)),
    ("openai-compatible only", {"openai_compatible": True}, (MINI,), (GPT4O,)),
    ("openai key + compatible", {"openai": True, "openai_compatible": True}, (MINI,), (GPT4O,)),
    ("both", {"anthropic": True, "openai": True}, (HAIKU, MINI), (SONNET, GPT4O)),
    (
        "explicit bare names",
        {"openai": True, "models_small": "claude-haiku-4-5, gpt-4o-mini", "models_large": "gpt-4o"},
        (HAIKU, MINI),
        (GPT4O,),
    ),
    (
        "explicit prefixes",
        {"anthropic": True, "models_small": "openai:gpt-4o-mini,anthropic:claude-haiku-4-5", "models_large": None},
        (MINI, HAIKU),
        (SONNET,),
    ),
    (
        "ollama names keep their colon",
        {"openai_compatible": True, "models_small": "llama3.1:8b", "models_large": "openai:qwen2.5:32b"},
        (ModelChoice("openai", "llama3.1:8b"),),
        (ModelChoice("openai", "qwen2.5:32b"),),
    ),
    ("blank list means defaults", {"anthropic": True, "models_small": " , ", "models_large": ""}, (HAIKU,), (SONNET,)),
    ("explicit list without any key", {"models_small": "gpt-4o-mini"}, (MINI,), (EXTRACTIVE,)),
    ("duplicates dropped", {"models_large": "gpt-4o,gpt-4o, openai:gpt-4o"}, (EXTRACTIVE,), (GPT4O,)),
]


@pytest.mark.parametrize(
    ("kwargs", "small", "large"),
    [case[1:] for case in CONFIG_CASES],
    ids=[case[0] for case in CONFIG_CASES],
)
def test_from_config(kwargs: dict[str, Any], small: tuple[ModelChoice, ...], large: tuple[ModelChoice, ...]) -> None:
    policy = config(**kwargs)
    assert (policy.small, policy.large) == (small, large)


def test_from_config_thresholds() -> None:
    policy = config(anthropic=True, large_prompt_tokens=10, large_max_tokens=20, large_feature_score=3)
    assert (policy.large_prompt_tokens, policy.large_max_tokens, policy.large_feature_score) == (10, 20, 3)
    default = config(anthropic=True)
    assert (default.large_prompt_tokens, default.large_max_tokens, default.large_feature_score) == (3000, 1024, 2)


def test_allowed_models() -> None:
    assert config(anthropic=True, openai=True).allowed_models() == (
        "claude-haiku-4-5",
        "gpt-4o-mini",
        "claude-sonnet-4-6",
        "gpt-4o",
    )
    assert config().allowed_models() == ("extractive",)


def test_parse_model_list_rejects_bad_entries() -> None:
    assert parse_model_list("extractive") == (EXTRACTIVE,)
    assert parse_model_list("Anthropic: claude-x") == (ModelChoice("anthropic", "claude-x"),)
    with pytest.raises(ValueError, match="model name"):
        parse_model_list("openai:")


@pytest.mark.parametrize(
    "kwargs",
    [{"small": ()}, {"large": ()}, {"large_prompt_tokens": 0}, {"large_max_tokens": -1}, {"large_feature_score": 0}],
)
def test_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(BOTH, **kwargs)


def test_model_choice_validation() -> None:
    with pytest.raises(ValueError, match="provider"):
        ModelChoice("azure", "gpt-4o")


# --- fallbacks ---------------------------------------------------------------------------

FALLBACK_CASES: list[tuple[str, dict[str, Any], str, tuple[ModelChoice, ...]]] = [
    ("both, small", {"anthropic": True, "openai": True}, "small", (MINI, SONNET, GPT4O)),
    ("both, large", {"anthropic": True, "openai": True}, "large", (GPT4O, HAIKU, MINI)),
    ("both, model gpt-4o", {"anthropic": True, "openai": True}, "gpt-4o", (SONNET, HAIKU, MINI)),
    ("anthropic only, small", {"anthropic": True}, "small", (SONNET,)),
    ("openai only, large", {"openai": True}, "large", (MINI,)),
    ("none", {}, "small", ()),
    ("same model in both tiers", {"models_small": "gpt-4o", "models_large": "gpt-4o"}, "large", ()),
]


@pytest.mark.parametrize(
    ("kwargs", "requested", "fallbacks"),
    [case[1:] for case in FALLBACK_CASES],
    ids=[case[0] for case in FALLBACK_CASES],
)
def test_fallbacks(kwargs: dict[str, Any], requested: str, fallbacks: tuple[ModelChoice, ...]) -> None:
    policy = config(**kwargs)
    route = choose_route(requested, question=SIMPLE, prompt_tokens=10, max_tokens=10, policy=policy)
    assert route.fallbacks == fallbacks


@pytest.mark.parametrize("requested", ["auto", "small", "large", "claude-haiku-4-5", "gpt-4o-mini", "gpt-4o"])
@pytest.mark.parametrize("question", [SIMPLE, "Compare A vs B and explain why"])
def test_fallbacks_never_repeat_the_choice_and_never_add_extractive(requested: str, question: str) -> None:
    route = choose_route(requested, question=question, prompt_tokens=10, max_tokens=10, policy=BOTH)
    assert route.choice not in route.fallbacks
    assert len(set(route.fallbacks)) == len(route.fallbacks)
    assert all(choice.provider != "extractive" for choice in route.fallbacks)
    # The rest of the chosen tier comes first: the other provider at the same size.
    same_tier = BOTH.tier_models(route.tier)
    assert route.fallbacks[0] in same_tier
    assert route.fallbacks[0].provider != route.provider
    assert route.candidates == (route.choice, *route.fallbacks)
