"""Routing by task size: pick the `small` or `large` model tier for a request.

Why it is pure: the decision has to be explainable (its reason goes into the
`meta` event and the metrics), deterministic (tests and cache keys rely on it)
and cheap (it runs on every cache miss). The service builds a
:class:`RoutingPolicy` from its settings once and calls :func:`choose_route` with the
measured prompt size; nothing here reads the environment or does I/O.

`auto` picks `large` when any trigger fires:

* prompt tokens (system + question + retrieved context) >= ``large_prompt_tokens``
* requested ``max_tokens`` >= ``large_max_tokens``
* question feature score >= ``large_feature_score``

The feature score is a weighted sum (see :data:`FEATURE_WEIGHTS`): every
sub-question beyond the first adds :data:`SUB_QUESTION_WEIGHT`, and each kind of
task found in the question adds its weight once. With the default threshold of
2, a comparison or a code question alone goes to `large`; a single "why" or
"explain" stays `small`, and any two of them together go to `large`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "AUTO",
    "DEFAULT_MODELS",
    "FEATURE_WEIGHTS",
    "KINDS",
    "PROVIDERS",
    "SUB_QUESTION_WEIGHT",
    "ModelChoice",
    "Route",
    "RoutingPolicy",
    "TaskFeatures",
    "Tier",
    "UnknownModelError",
    "choose_route",
    "parse_model_list",
    "task_features",
]

Tier = Literal["small", "large"]
TIERS: Final[tuple[Tier, Tier]] = ("small", "large")
AUTO: Final = "auto"

PROVIDERS: Final = frozenset({"anthropic", "openai", "extractive"})

# Per-provider defaults, used when RAG_MODELS_SMALL / RAG_MODELS_LARGE are unset.
DEFAULT_MODELS: Final[Mapping[str, Mapping[Tier, str]]] = MappingProxyType(
    {
        "anthropic": MappingProxyType({"small": "claude-haiku-4-5", "large": "claude-sonnet-4-6"}),
        "openai": MappingProxyType({"small": "gpt-4o-mini", "large": "gpt-4o"}),
    }
)

# Weight of each task kind in the feature score; a kind counts once however often it appears.
FEATURE_WEIGHTS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "compare": 2,  # synthesis across several sources
        "code": 2,  # code quality gains most from the larger model
        "explain": 1,
        "why": 1,
        "how-to": 1,
        "list": 1,
    }
)
SUB_QUESTION_WEIGHT: Final = 1  # per sub-question beyond the first


@dataclass(frozen=True)
class ModelChoice:
    """One concrete model at one provider (`anthropic`, `openai` or `extractive`)."""

    provider: str
    model: str

    def __post_init__(self) -> None:
        """Reject typos early: an unknown provider would only fail at generation time."""
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; expected one of {sorted(PROVIDERS)}")
        if not self.model or self.model != self.model.strip():
            raise ValueError(f"invalid model name {self.model!r}")


EXTRACTIVE: Final = ModelChoice("extractive", "extractive")


def _infer_provider(model: str) -> str:
    """Bare model names: Claude models are Anthropic's, everything else speaks the OpenAI API."""
    lowered = model.lower()
    if lowered.startswith("claude"):
        return "anthropic"
    if lowered == "extractive":
        return "extractive"
    return "openai"


def parse_model_list(text: str) -> tuple[ModelChoice, ...]:
    """Parse a comma list of "provider:model" or bare model names, dropping blanks and duplicates.

    Only a known provider before the first colon is read as a prefix, so
    OpenAI-compatible names that contain colons (Ollama's "llama3.1:8b") stay whole.
    """
    choices: list[ModelChoice] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        prefix, sep, rest = item.partition(":")
        if sep and prefix.strip().lower() in PROVIDERS:
            choice = ModelChoice(prefix.strip().lower(), rest.strip())
        else:
            choice = ModelChoice(_infer_provider(item), item)
        if choice not in choices:
            choices.append(choice)
    return tuple(choices)


@dataclass(frozen=True)
class RoutingPolicy:
    """The two tiers' models in order of preference, and the `auto` thresholds."""

    small: tuple[ModelChoice, ...]
    large: tuple[ModelChoice, ...]
    large_prompt_tokens: int = 3000
    large_max_tokens: int = 1024
    large_feature_score: int = 2

    def __post_init__(self) -> None:
        """Fail fast on bad settings rather than on the first request."""
        if not self.small or not self.large:
            raise ValueError("both routing tiers need at least one model")
        if min(self.large_prompt_tokens, self.large_max_tokens, self.large_feature_score) < 1:
            raise ValueError("routing thresholds must be positive")

    @classmethod
    def from_config(
        cls,
        *,
        anthropic: bool,
        openai: bool,
        openai_compatible: bool,
        models_small: str | None,
        models_large: str | None,
        large_prompt_tokens: int = 3000,
        large_max_tokens: int = 1024,
        large_feature_score: int = 2,
    ) -> RoutingPolicy:
        """Build the tiers from which providers are configured and the optional explicit lists.

        An explicit, non-blank list replaces that tier's defaults as written. The
        defaults are Anthropic's models first when an Anthropic key is set, then
        the GPT models when an OpenAI key or an OpenAI-compatible base URL is set;
        with no provider at all both tiers use the offline extractive generator.
        """
        providers: list[str] = []
        if anthropic:
            providers.append("anthropic")
        if openai or openai_compatible:
            providers.append("openai")

        def listed(tier: Tier, explicit: str | None) -> tuple[ModelChoice, ...]:
            parsed = parse_model_list(explicit) if explicit else ()
            if parsed:
                return parsed
            if not providers:
                return (EXTRACTIVE,)
            return tuple(ModelChoice(p, DEFAULT_MODELS[p][tier]) for p in providers)

        return cls(
            small=listed("small", models_small),
            large=listed("large", models_large),
            large_prompt_tokens=large_prompt_tokens,
            large_max_tokens=large_max_tokens,
            large_feature_score=large_feature_score,
        )

    def tier_models(self, tier: Tier) -> tuple[ModelChoice, ...]:
        """The tier's models in order of preference."""
        return self.small if tier == "small" else self.large

    def choices(self) -> tuple[ModelChoice, ...]:
        """Every configured model once, small tier first, in order of preference."""
        seen: list[ModelChoice] = []
        for choice in (*self.small, *self.large):
            if choice not in seen:
                seen.append(choice)
        return tuple(seen)

    def allowed_models(self) -> tuple[str, ...]:
        """The model names a request may ask for by name (besides auto/small/large)."""
        return tuple(dict.fromkeys(choice.model for choice in self.choices()))


# --- question features ---------------------------------------------------------

_FLAGS: Final = re.IGNORECASE

_FENCED_CODE: Final = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_INLINE_CODE: Final = re.compile(r"`[^`\n]*`")
_ABBREVIATIONS: Final = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|approx)\.", _FLAGS)
# A sentence ends at a run of '?', at '.' or '!' followed by whitespace or the end, or at a line break.
# ';' is left to _JOINED_QUESTION: in "foo(); do?" it is code, in "what is X; what is Y" a joint.
_SENTENCE_END: Final = re.compile(r"(\?+|[.!]+(?=\s|$)|\n+)")
_INTERROGATIVES: Final = (
    r"what|why|how|when|where|who|whom|whose|which|is|are|was|were|can|could|should|would|will|do|does|did|"
    r"explain|describe|compare|list|summari[sz]e|define|give|show|tell|name"
)
_STARTS_AS_QUESTION: Final = re.compile(rf"^\W*(?:{_INTERROGATIVES})\b", _FLAGS)
_LEADING_CONJUNCTION: Final = re.compile(r"^\W*(?:and|or|but|also|then|plus)\b", _FLAGS)
# "… and how does it …", "… and also why …", "… as well as what …": a further question inside one sentence.
# Commas alone are not enough: ", which …" is far more often a relative clause than a new question.
_JOINED_QUESTION: Final = re.compile(
    r"(?:\b(?:and|or|but|also|then|plus|as\s+well\s+as)|;)\s+(?:also\s+|then\s+)?"
    r"(?:what|why|how|when|where|who|whom|whose|which|explain|describe|compare|list)\b",
    _FLAGS,
)

_KIND_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    (
        "compare",
        re.compile(
            r"\bcompar(?:e|es|ed|ing|ison|isons)\b|\bvs\b\.?|\bversus\b|\bdifferences?\s+between\b"
            r"|\bdiffer(?:s|ent)?\s+from\b|\bhow\s+(?:do|does)\b[^?.]*\bdiffer\b|\bpros\s+and\s+cons\b"
            r"|\btrade-?offs?\b|\bcontrast\b|\b(?:better|worse|faster|slower|cheaper)\s+than\b",
            _FLAGS,
        ),
    ),
    (
        "explain",
        re.compile(
            r"\bexplain\w*\b|\bexplanation\b|\bdescribe\b|\belaborate\b|\bwalk\s+(?:me|us)\s+through\b"
            r"|\bin\s+detail\b|\btell\s+(?:me|us)\s+about\b|\bhow\s+(?:does|do|did)\b[^?.]*\bwork\b",
            _FLAGS,
        ),
    ),
    (
        "why",
        re.compile(
            r"\bwhy\b|\bhow\s+come\b|\breasons?\s+(?:for|why|behind)\b|\bwhat\s+causes?\b"
            r"|\bwhat\s+(?:is|are)\s+the\s+(?:reasons?|causes?)\b",
            _FLAGS,
        ),
    ),
    (
        "how-to",
        re.compile(
            r"\bhow\s+to\b|\bhow\s+(?:do|can|should|would|could|might)\s+(?:i|we|you|one)\b"
            r"|\bsteps?\s+(?:to|for)\b|\bstep[- ]by[- ]step\b|\binstructions?\s+(?:to|for|on)\b",
            _FLAGS,
        ),
    ),
    (
        "list",
        re.compile(
            r"^\W*(?:list|enumerate)\b|\b(?:list|enumerate)\s+(?:all|the|every|some|any|each|\d+)\b"
            r"|\bwhat\s+are\s+(?:all\s+)?the\s+(?:types|kinds|steps|ways|options|benefits|advantages"
            r"|disadvantages|features|causes|symptoms|examples)\b|\b(?:top|name)\s+\d+\b"
            r"|\b\d+\s+(?:ways|reasons|examples|steps|tips|types|kinds|options)\b",
            _FLAGS,
        ),
    ),
)
# Code: backticks, code-like tokens, declarations in common languages, language names and code words.
_CODE_SIGNS: Final = re.compile(
    r"`|\bdef\s+\w+\s*\(|=>|\(\s*\)\s*;|\{\s*\}|\b\w+\(\)|[=!]==?|&&|\|\||::|#include\b"
    r"|\b(?:function|lambda|const|let|var|fn|func)\s+\w+\s*[=(:]|\bclass\s+\w+\s*[(:{]"
    r"|\bfrom\s+[\w.]+\s+import\s+\w|\bimport\s+[\w.]+\s*;"
    r"|\b(?:python|javascript|typescript|java|kotlin|golang|sql|bash|powershell|regex|json|yaml)\b|\bc\+\+|\bc#"
    r"|\b(?:code|source\s+code)\s+(?:snippet|example|sample)s?\b|\bstack\s*trace\b|\btraceback\b"
    r"|\bwrite\s+(?:a|an|the|some)\s+(?:function|script|program|query|class|method)\b",
    _FLAGS,
)
# SELECT ... FROM is only code when written in capitals ("select a plan from the list" is prose).
_SQL_WORDS: Final = re.compile(r"\bSELECT\b.+\bFROM\b")
KINDS: Final = ("compare", "explain", "why", "how-to", "code", "list")


@dataclass(frozen=True)
class TaskFeatures:
    """What the question asks for: how many sub-questions, which kinds of task, and the weighted score."""

    sub_questions: int
    kinds: tuple[str, ...]
    score: int

    def describe(self) -> str:
        """A short human-readable summary for route reasons, e.g. "2 sub-questions, compare"."""
        parts = [f"{self.sub_questions} sub-questions"] if self.sub_questions > 1 else []
        parts.extend(self.kinds)
        return ", ".join(parts) if parts else "simple question"


def _count_sub_questions(prose: str) -> int:
    """Sentences that end in '?' or open like a question or request, plus questions joined inside them."""
    text = _ABBREVIATIONS.sub(" ", prose)
    pieces = _SENTENCE_END.split(text)
    count = 0
    # split() with a capturing group alternates sentence, terminator, sentence, terminator, ...
    for index in range(0, len(pieces), 2):
        sentence = pieces[index]
        if not re.search(r"\w", sentence):
            continue
        terminator = pieces[index + 1] if index + 1 < len(pieces) else ""
        # "Is it fast? And why?": the second sentence is one question, not a question plus a joined one.
        sentence = _LEADING_CONJUNCTION.sub("", sentence)
        if terminator.startswith("?") or _STARTS_AS_QUESTION.search(sentence):
            count += 1 + len(_JOINED_QUESTION.findall(sentence))
    if count == 0 and re.search(r"\w", text):
        return 1
    return count


def task_features(question: str) -> TaskFeatures:
    """Measure the question: sub-questions (code excluded, so a `?:` in code is not one) and task kinds."""
    prose = _INLINE_CODE.sub(" ", _FENCED_CODE.sub(" ", question))
    sub_questions = _count_sub_questions(prose)
    # Code is looked for in the whole question; every other kind only in the prose around the code.
    found = {kind for kind, pattern in _KIND_PATTERNS if pattern.search(prose)}
    if _CODE_SIGNS.search(question) or _SQL_WORDS.search(question):
        found.add("code")
    kinds = tuple(kind for kind in KINDS if kind in found)
    score = SUB_QUESTION_WEIGHT * max(sub_questions - 1, 0) + sum(FEATURE_WEIGHTS[kind] for kind in kinds)
    return TaskFeatures(sub_questions=sub_questions, kinds=kinds, score=score)


# --- the decision ----------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """The chosen model, why it was chosen, and what to try, in order, if it fails before streaming."""

    tier: Tier
    model: str
    provider: str
    reason: str
    fallbacks: tuple[ModelChoice, ...]

    @property
    def choice(self) -> ModelChoice:
        return ModelChoice(self.provider, self.model)

    @property
    def candidates(self) -> tuple[ModelChoice, ...]:
        """Everything to try, in order: the choice, then its fallbacks."""
        return (self.choice, *self.fallbacks)


class UnknownModelError(ValueError):
    """The request named a model that is not in the configured allow-list (a client error, HTTP 400)."""

    def __init__(self, requested: str, allowed: tuple[str, ...]) -> None:
        shown = requested if len(requested) <= 80 else requested[:79] + "…"
        options = ", ".join((AUTO, *TIERS, *allowed))
        super().__init__(f"unknown model {shown!r}; use one of: {options}")
        self.requested = requested
        self.allowed = allowed


def _route(policy: RoutingPolicy, tier: Tier, chosen: ModelChoice, reason: str) -> Route:
    """Fallbacks: the rest of the chosen tier (usually the other provider), then the other tier; never `chosen`."""
    other: Tier = "large" if tier == "small" else "small"
    fallbacks: list[ModelChoice] = []
    for choice in (*policy.tier_models(tier), *policy.tier_models(other)):
        if choice != chosen and choice not in fallbacks:
            fallbacks.append(choice)
    return Route(tier=tier, model=chosen.model, provider=chosen.provider, reason=reason, fallbacks=tuple(fallbacks))


def _find_model(requested: str, policy: RoutingPolicy) -> tuple[Tier, ModelChoice] | None:
    """Look a requested name up by bare model name or by "provider:model"; the small tier wins a tie."""
    for tier in TIERS:
        for choice in policy.tier_models(tier):
            if requested in (choice.model, f"{choice.provider}:{choice.model}"):
                return tier, choice
    return None


def choose_route(requested: str, *, question: str, prompt_tokens: int, max_tokens: int, policy: RoutingPolicy) -> Route:
    """Route one request: `small`/`large` force a tier, a model name is looked up, `auto` measures the task."""
    if prompt_tokens < 0 or max_tokens < 0:
        raise ValueError("prompt_tokens and max_tokens must not be negative")
    name = requested.strip()
    keyword = name.lower()
    if keyword in TIERS:
        tier: Tier = "small" if keyword == "small" else "large"
        return _route(policy, tier, policy.tier_models(tier)[0], f"requested tier {tier}")
    if keyword != AUTO:
        found = _find_model(name, policy)
        if found is None:
            raise UnknownModelError(requested, policy.allowed_models())
        tier, choice = found
        return _route(policy, tier, choice, f"requested model {choice.model} ({tier} tier)")

    features = task_features(question)
    triggers: list[str] = []
    if prompt_tokens >= policy.large_prompt_tokens:
        triggers.append(f"{prompt_tokens} prompt tokens >= {policy.large_prompt_tokens}")
    if max_tokens >= policy.large_max_tokens:
        triggers.append(f"max_tokens {max_tokens} >= {policy.large_max_tokens}")
    if features.score >= policy.large_feature_score:
        triggers.append(f"{features.describe()} (score {features.score} >= {policy.large_feature_score})")
    if triggers:
        return _route(policy, "large", policy.large[0], "auto: " + "; ".join(triggers))

    question_part = features.describe()
    if features.score > 0:
        question_part += f" (score {features.score} < {policy.large_feature_score})"
    reason = f"auto: {prompt_tokens} prompt tokens, max_tokens {max_tokens}, {question_part}"
    return _route(policy, "small", policy.small[0], reason)
