"""The semantic cache's optional second opinion: the small model tier asked whether two questions ask
for the same information (`RAG_SEMANTIC_VERIFY=small`). The prompt and the strict reading of the
reply; the call itself is service/answer/verification.py.

Pure: no I/O, no settings.
"""

from __future__ import annotations

from typing import Final

from service.policy.prompt import neutralize

VERIFY_SYSTEM: Final = (
    "You decide whether an answer written for one question fully and correctly answers another. "
    "Reply yes only if both questions ask for exactly the same information (same subject, same "
    "direction, same numbers, same person); otherwise reply no. Reply with one word: yes or no."
)
VERIFY_MAX_TOKENS: Final = 3
QUESTION_A: Final = "Question A: "
QUESTION_B: Final = "Question B: "


def verify_prompt(question: str, cached: str) -> str:
    """The user message: the new question (A) and the cached one (B), each on one line, escaped like sources."""
    a, b = (neutralize(" ".join(text.split())) for text in (question, cached))
    return f"{QUESTION_A}{a}\n{QUESTION_B}{b}\n\nDo A and B ask for the same information? Answer yes or no."


def verdict(reply: str) -> bool:
    """True only for a plain "yes" (any case, a trailing full stop allowed); anything else is a no."""
    return reply.strip().rstrip(".").strip().lower() == "yes"
