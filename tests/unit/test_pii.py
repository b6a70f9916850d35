"""PII the review found unredacted (issue 12, finding 4), and the false positives on ordinary questions."""

from __future__ import annotations

import pytest

from service.policy.guardrails import GuardrailPolicy, check_question, iban_valid, redact_pii
from service.policy.tokens import count_tokens
from tests.support.injections import public_questions
from tests.support.servers import SHARED_DATA

FOUND = [
    # contiguous and international phone numbers
    ("Call me on 5551234567 tomorrow", "Call me on [PHONE] tomorrow", {"phone": 1}),
    ("Call me on 15551234567 tomorrow", "Call me on [PHONE] tomorrow", {"phone": 1}),
    ("Our London desk is 020 7946 0958.", "Our London desk is [PHONE].", {"phone": 1}),
    ("Or dial 0044 20 7946 0958 from abroad", "Or dial [PHONE] from abroad", {"phone": 1}),
    ("Or dial +44 20 7946 0958 from abroad", "Or dial [PHONE] from abroad", {"phone": 1}),
    ("Berlin (030) 1234567 or 030-1234567", "Berlin [PHONE] or [PHONE]", {"phone": 2}),
    ("Paris 06 12 34 56 78", "Paris [PHONE]", {"phone": 1}),
    ("UK 02079460958", "UK [PHONE]", {"phone": 1}),
    ("Call 555\u2013123\u20134567", "Call [PHONE]", {"phone": 1}),  # en dashes
    # US social security numbers
    ("My SSN is 078-05-1120, is that safe?", "My SSN is [SSN], is that safe?", {"ssn": 1}),
    ("SSN 078 05 1120", "SSN [SSN]", {"ssn": 1}),
    ("social security number: 078051120", "social security number: [SSN]", {"ssn": 1}),
    # IBANs, checked with mod 97
    ("Pay to DE89 3704 0044 0532 0130 00 please", "Pay to [IBAN] please", {"iban": 1}),
    ("Pay to GB82WEST12345698765432 today", "Pay to [IBAN] today", {"iban": 1}),
    ("iban nl91abna0417164300 ok", "iban [IBAN] ok", {"iban": 1}),
    # cards with dots and mixed separators
    ("Card 4111.1111.1111.1111 declined", "Card [CARD] declined", {"card": 1}),
    ("Card 4111 1111-1111.1111 declined", "Card [CARD] declined", {"card": 1}),
    # full-width digits and at signs, digits joined by invisible characters
    (
        "Card \uff14\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11 x",
        "Card [CARD] x",
        {"card": 1},
    ),
    ("Call \uff15\uff15\uff15-\uff11\uff12\uff13-\uff14\uff15\uff16\uff17", "Call [PHONE]", {"phone": 1}),
    ("Card 4111\u200b1111\u200b1111\u200b1111 x", "Card [CARD] x", {"card": 1}),
    ("Call 555\u200d123\u200d4567 now", "Call [PHONE] now", {"phone": 1}),
    ("Mail john.doe\uff20example.com now", "Mail [EMAIL] now", {"email": 1}),
    ("Mail john.doe@exam\u200bple.com now", "Mail [EMAIL] now", {"email": 1}),
    ("Arabic \u0665\u0665\u0665-\u0661\u0662\u0663-\u0664\u0665\u0666\u0667", "Arabic [PHONE]", {"phone": 1}),
    # the review's question: all three in one
    (
        "My SSN is 078-05-1120, phone 5551234567 and card 4111.1111.1111.1111: can you store them?",
        "My SSN is [SSN], phone [PHONE] and card [CARD]: can you store them?",
        {"card": 1, "phone": 1, "ssn": 1},
    ),
]


@pytest.mark.parametrize(("question", "expected", "counts"), FOUND)
def test_pii_is_found_through_formatting_and_unicode(question: str, expected: str, counts: dict[str, int]) -> None:
    result = check_question(question, GuardrailPolicy(), count_tokens)
    assert result.text == expected
    assert dict(result.redactions) == counts
    assert redact_pii(question) == expected


NOT_PII = [
    "What is 1700000000 in unix time?",  # starts with 1: not a North American number
    "Is 078-05-112 a valid code?",  # too short for an SSN
    "Ids 000-12-3456 and 666-12-3456 are never issued",
    "Order 9001-12-1234 shipped",  # 9xx areas are not SSNs
    "GB82WEST12345698765433 fails the check",  # one digit off: mod 97 says no
    "The 2024 version 10.2.3 ships in 12 weeks",
    "ISBN 978-3-16-148410-0",
    "See RFC 7231 section 6.5.1 and ISO 8601 dates 2024-01-15",
    "Sort 5555555555 placeholders out",
    "Pi is 3.14159265358979",
]


@pytest.mark.parametrize("question", NOT_PII)
def test_lookalikes_are_left_alone(question: str) -> None:
    assert redact_pii(question) == question


@pytest.mark.parametrize(
    ("iban", "valid"),
    [("DE89370400440532013000", True), ("GB82WEST12345698765432", True), ("DE89370400440532013001", False)],
)
def test_iban_checksum(iban: str, valid: bool) -> None:
    assert iban_valid(iban) is valid


def test_false_positives_on_public_questions() -> None:
    """msmarco and quora questions: anything redacted is looked at (the list below is what we accept)."""
    if not SHARED_DATA.exists():
        pytest.skip("the public question sets (../shared/data) are not beside this checkout")
    questions = public_questions()
    assert len(questions) > 8000
    redacted = {q: redact_pii(q) for q in questions if redact_pii(q) != q}
    # Every hit here was read: real-looking phone numbers and addresses in quora questions.
    assert len(redacted) <= 10, redacted
