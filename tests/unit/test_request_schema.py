"""Request bodies take JSON numbers only where the schema says number (found by the schema fuzzer:
`"temperature": false` was accepted as 0.0)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.answer.schemas import RagRequest
from service.http.openai_api import ChatCompletionRequest

MESSAGES = [{"role": "user", "content": "What is RRF?"}]


@pytest.mark.parametrize(
    "field", [{"temperature": False}, {"temperature": "0.5"}, {"top_k": True}, {"top_k": "5"}, {"max_tokens": "512"}]
)
def test_rag_request_refuses_booleans_and_strings_for_numbers(field: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RagRequest.model_validate({"question": "What is RRF?", **field})


@pytest.mark.parametrize("field", [{"temperature": True}, {"max_tokens": "64"}, {"max_completion_tokens": False}])
def test_chat_request_refuses_booleans_and_strings_for_numbers(field: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": MESSAGES, **field})


def test_numbers_still_pass_and_ints_are_floats() -> None:
    request = RagRequest.model_validate({"question": "What is RRF?", "temperature": 1, "top_k": 3.0, "max_tokens": 64})
    assert (request.temperature, request.top_k, request.max_tokens) == (1.0, 3, 64)
    chat = ChatCompletionRequest.model_validate({"messages": MESSAGES, "temperature": 0, "max_tokens": 10})
    assert (chat.temperature, chat.max_tokens) == (0, 10)
