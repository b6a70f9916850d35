"""Property-based fuzzing of the OpenAPI schema with schemathesis, against the real app.

The app runs on a real uvicorn server with its lifespan (Postgres, Valkey, the local
embedding model and the offline extractive generator; no provider keys), with a couple of
documents ingested and a real admin key. schemathesis generates valid and invalid requests
for every operation in the schema the app serves and checks every response:

- no 5xx (`not_a_server_error`);
- the status code, content type, headers and body are what the schema declares (its
  built-in conformance checks), so the schema has to tell the truth about errors too;
- every non-2xx JSON body has the error shape: `{"error": {"code", "message"}}`, and under
  `/v1/` OpenAI's `{"error": {"message", "type", "param", "code"}}`.

Bounded and deterministic: a fixed number of examples per operation, derandomized
generation and no example database, so CI sees the same requests on every run.

schemathesis' `from_fixture` loader does not work with pytest 9 (it reads the removed
`Function._nodeid`), so the schema is built from the app object at import time (the same
document `/openapi.json` serves, which a test checks) and each operation is its own test item
sharing one server for the module.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis import Case, CheckContext, Response

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from tests.support.answers import seed
from tests.support.module_env import module_settings, serve_in_thread
from tests.support.servers import Servers, bearer, make_key, make_settings

MAX_EXAMPLES = 30  # per operation and generation mode (positive, negative)

ANSWER_PATHS = r"^/(rag/(stream|answer)|v1/chat/completions)$"
CONFIG: dict[str, Any] = {
    "seed": 20240501,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    # Examples, coverage and fuzzing phases, one request at a time; no stateful sequences.
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        # The body size limit (RAG_MAX_BODY_BYTES) refuses a body before the schema is looked at:
        # a question over its maxLength is also a body over the limit, hence 413.
        "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]},
    },
    "operations": [
        {
            # What a schema cannot say about a schema-valid question: the guardrails refuse it
            # (400: empty, injection, control characters, too long), the model is not in the
            # configured allow-list or a filter key is not `source` (422), or it asks for an OpenAI
            # feature the pipeline cannot provide (400 unsupported_parameter); a history over
            # RAG_HISTORY_MAX_TURNS / _MAX_TOKENS is a 413, an unknown role in it a 400.
            "include-path-regex": ANSWER_PATHS,
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx", 400, 401, 403, 404, 409, 413, 422, 429]},
            },
        },
        {
            # Unknown query parameters are ignored, as HTTP APIs do; only `range` is checked.
            "include-path-regex": r"^/dashboard/api/",
            "generation": {"allow-extra-parameters": False},
        },
    ],
}


def load_schema() -> schemathesis.BaseSchema:
    """The app's OpenAPI document; building the app connects nothing (that is the lifespan's job)."""
    app = create_app(make_settings("postgresql://unused", "redis://unused", Path("/nonexistent")))
    return schemathesis.openapi.from_dict(app.openapi(), config=schemathesis.Config.from_dict(CONFIG))


schema = load_schema()


# --- the served app --------------------------------------------------------------------------


@dataclass
class Target:
    url: str
    key: str  # an admin key: reaches every operation


@pytest.fixture(scope="module")
async def target(
    servers: Servers, local_embedder: LocalEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Target]:
    """One database and server for the module; schemathesis is synchronous, so the server has its own thread."""
    # schemathesis also sends requests without the key (ignored_auth, mutated headers): those
    # must stay 401s, not turn into the failed-auth limit's 429 for the whole address.
    async with module_settings(
        servers, tmp_path_factory.mktemp("fuzz"), auth_failures_per_minute=1_000_000
    ) as settings:
        await seed(settings, local_embedder)
        key = await make_key(settings, "admin")
        with serve_in_thread(create_app(settings, embedder=local_embedder)) as url:
            yield Target(url, key)


# --- checks ----------------------------------------------------------------------------------

OPENAI_ERROR_TYPES = {"invalid_request_error", "permission_error", "rate_limit_error", "server_error"}


# "<with|without> Authorization <operation>" -> statuses seen (with: the key, or a mutated header)
SEEN: dict[str, Counter[int]] = defaultdict(Counter)


def error_shape(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Every non-2xx JSON answer is an error object; OpenAI's shape under /v1/."""
    sent = "with" if "authorization" in {name.lower() for name in response.request.headers} else "without"
    SEEN[f"{sent} Authorization {case.operation.label}"][response.status_code] += 1
    if response.status_code < 300:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("application/json"):
        # Only uvicorn itself answers in plain text (malformed HTTP); the app always sends JSON.
        raise AssertionError(f"{response.status_code} with content type {content_type!r}, not JSON")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"no error object: {body!r}"
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], f"error.code: {error!r}"
    assert isinstance(error.get("message"), str) and error["message"], f"error.message: {error!r}"
    if case.operation.path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, f"not OpenAI's shape: {error!r}"
        assert error["type"] in OPENAI_ERROR_TYPES, error
        assert error["param"] is None or isinstance(error["param"], str), error
    elif case.operation.path != "/ready":  # /ready's 503 also carries `status` and `checks`
        assert set(error) == {"code", "message"}, f"not the error shape {{code, message}}: {error!r}"
    return None


# --- the tests -------------------------------------------------------------------------------


def test_the_fuzzed_schema_is_the_served_one(target: Target) -> None:
    served = requests.get(f"{target.url}/openapi.json", timeout=10).json()
    assert served == schema.raw_schema


@schema.parametrize()
def test_fuzz_with_an_admin_key(case: Case[Any], target: Target) -> None:
    case.call_and_validate(base_url=target.url, headers=bearer(target.key), additional_checks=[error_shape])


# `include()` would select nothing here: with `operations` in the config, schemathesis ORs it
# with a catch-all filter. `exclude()` works: everything but the public endpoints.
@schema.exclude(path_regex=r"^/(health|ready|dashboard)$").parametrize()
def test_fuzz_without_a_key_is_401(case: Case[Any], target: Target) -> None:
    response = case.call_and_validate(base_url=target.url, additional_checks=[error_shape])
    code = response.json()["error"]["code"]
    if case.method.upper() != case.operation.method.upper():  # the coverage phase tries other methods
        assert (response.status_code, code) == (405, "method_not_allowed")
    elif response.status_code == 413:  # the size limit comes before everything, authentication too
        assert code == "request_too_large"
    elif response.status_code == 404:  # a path parameter that routes nowhere (e.g. a newline in it)
        assert code == "not_found" and case.path_parameters
    else:
        # Authentication comes before the body is looked at: valid or not, every request is a 401.
        assert (response.status_code, code) == (401, "unauthorized"), response.text


def test_the_fuzzing_reached_past_authentication() -> None:
    """Runs after the fuzz tests above (file order): they must have got answers, not only 401s."""
    if not SEEN:
        pytest.skip("run together with the fuzz tests above")
    for label in ("POST /rag/stream", "POST /rag/answer", "POST /v1/chat/completions"):
        statuses = SEEN[f"with Authorization {label}"]
        assert statuses[200] > 0, (label, statuses)  # answered by the pipeline
        assert statuses[400] > 0 and statuses[422] > 0, (label, statuses)  # guardrails and schema
    assert all(status < 500 for statuses in SEEN.values() for status in statuses), SEEN
    public = ("/health", "/ready", "/dashboard")
    unauthenticated = {
        status
        for label, statuses in SEEN.items()
        if label.startswith("without") and not label.endswith(public)
        for status in statuses
    }
    assert unauthenticated <= {401, 404, 405, 413}, unauthenticated
