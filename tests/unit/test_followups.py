"""The offline follow-up rewrite (service/policy/followups.py): pronouns and ellipsis from earlier user turns."""

from __future__ import annotations

import pytest

from service.policy.followups import needs_rewrite, rewrite, subject_of


@pytest.mark.parametrize(
    ("previous", "question", "standalone"),
    [
        (
            ["What is coalescing?"],
            "How many provider calls does it make?",
            "How many provider calls does coalescing make?",
        ),
        (["How do I create an API key?"], "How do I revoke it?", "How do I revoke an API key?"),
        (["How big are the chunks?"], "Do they overlap?", "Do the chunks overlap?"),
        (
            ["How do I run several worker processes?"],
            "Do they share the cache?",
            "Do several worker processes share the cache?",
        ),
        (["What is the semantic cache?"], "How do I turn it off?", "How do I turn the semantic cache off?"),
        (
            ["What is the exact cache key made of?"],
            "Does the corpus state go into it?",
            "Does the corpus state go into the exact cache key?",
        ),
        (["What happens when Redis goes down?"], "What about Postgres?", "What happens when Postgres goes down?"),
        (["How do I ingest a PDF?"], "How about HTML files?", "How do I ingest HTML files?"),
        (["How do I point ragcache at a local Ollama server?"], "And for vLLM?", "How do I point ragcache at vLLM?"),
        (["What does bypass do?"], "And refresh?", "What does refresh do?"),
        (["How do I limit the cache size?"], "Can I change that?", "Can I change the cache size?"),
    ],
)
def test_follow_ups_become_standalone(previous: list[str], question: str, standalone: str) -> None:
    assert rewrite(question, previous) == standalone


def test_a_chain_of_follow_ups_resolves_each_turn_against_the_one_before() -> None:
    turns = ["How do I flush the cache?", "Does it also delete the rate limits?"]
    assert rewrite("And the metrics history?", turns) == "Does the cache also delete the metrics history?"


@pytest.mark.parametrize(
    "question",
    [
        "How do I flush the cache?",
        "What happens to a request body that is too big?",  # a relative "that"
        "Does this key need the admin scope?",  # a determiner "this"
        "And what do errors look like?",  # "and" before a question of its own
        "Which itinerary is cheapest?",  # "it" inside a word
    ],
)
def test_a_standalone_question_is_returned_as_it_is(question: str) -> None:
    assert not needs_rewrite(question)
    assert rewrite(question, ["What is coalescing?"]) is question


def test_without_history_nothing_is_rewritten() -> None:
    question = "How do I revoke it?"
    assert rewrite(question, []) is question


def test_a_pronoun_with_no_subject_to_resolve_stays() -> None:
    assert rewrite("Is it fast?", ["Why?"]) == "Is it fast?"


def test_an_ellipsis_without_a_subject_keeps_the_phrase() -> None:
    assert rewrite("How about JSON lines?", ["Which file formats can I ingest?"]) == (
        "Which file formats can I ingest: JSON lines?"
    )


@pytest.mark.parametrize(
    ("question", "subject"),
    [
        ("What is coalescing?", "coalescing"),
        ("What are the prompt-injection checks?", "the prompt-injection checks"),
        ("What does a 429 rate_limited error mean?", "a 429 rate_limited error"),
        ("What happens when Redis goes down?", "Redis"),
        ("How does model routing work?", "model routing"),
        ("How is the cache invalidated after re-ingest?", "the cache"),
        ("Where can I see the cache hit ratio?", "the cache hit ratio"),
        ("Why?", ""),
    ],
)
def test_subjects(question: str, subject: str) -> None:
    assert subject_of(question) == subject


def test_special_characters_in_turns_are_plain_text() -> None:
    # Regex metacharacters and backslashes in the turns must neither break nor steer the rules.
    previous = [r"What is C:\path\(x)+[y]?"]
    assert rewrite("Does it work?", previous) == r"Does C:\path\(x)+[y] work?"
    assert rewrite(r"What about \1 and $0?", ["What does bypass do?"]) == r"What does \1 and $0 do?"


def test_a_pronoun_takes_the_subject_of_the_nearest_earlier_turn_that_has_one() -> None:
    turns = ["What is coalescing?", "How many provider calls does it make for 100 of them?"]
    assert rewrite("Is it shared between workers?", turns) == "Is coalescing shared between workers?"


def test_the_object_of_can_i_is_the_subject() -> None:
    previous = ["Can I use the OpenAI SDK with ragcache?"]
    assert rewrite("What does it return?", previous) == "What does the OpenAI SDK return?"


def test_a_closing_there_points_back_and_an_existential_one_does_not() -> None:
    previous = ["What does the readiness endpoint report?"]
    assert rewrite("What does degraded mean there?", previous) == "What does degraded mean in the readiness endpoint?"
    assert not needs_rewrite("Is there a limit on questions?")
