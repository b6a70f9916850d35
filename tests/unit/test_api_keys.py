"""API keys without a database: the key format, and checking a secret against its stored hash."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service.http.auth import ApiKey, new_key, parse_key, verify


def test_new_keys_parse_back_and_are_unique() -> None:
    keys = [new_key() for _ in range(200)]
    for token, key_id, secret_hash in keys:
        parsed = parse_key(token)
        assert parsed is not None and parsed[0] == key_id
        assert verify(ApiKey(key_id, "n", secret_hash, ("query",), None, None), parsed[1])
    assert len({k[0] for k in keys}) == len({k[1] for k in keys}) == 200


@pytest.mark.parametrize(
    "token",
    [
        "",
        "rck_",
        "sk-ant-api03-xyz",
        "rck_ABCDEFGHIJKL_" + "a" * 43,
        "rck_abcdefghijkl_" + "a" * 42,
        "rck_abc_" + "a" * 43,
    ],
)
def test_malformed_keys_do_not_parse(token: str) -> None:
    assert parse_key(token) is None


def test_verify_refuses_wrong_secrets_unknown_and_revoked_keys() -> None:
    token, key_id, secret_hash = new_key()
    _, secret = parse_key(token) or ("", "")
    key = ApiKey(key_id, "n", secret_hash, ("query",), None, None)
    assert verify(key, secret)
    assert not verify(key, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert not verify(None, secret)
    assert not verify(ApiKey(key_id, "n", secret_hash, ("query",), None, None, revoked_at=datetime.now(UTC)), secret)
