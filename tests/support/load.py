"""The one minimal HTTP/1.1 load client: asyncio streams, keep-alive, no httpx.

Cheap per request, so one process can drive hundreds of answer streams on a small machine without
becoming the bottleneck first. `Reply` stamps the time of the first SSE `token` event as its bytes
arrive; the body is parsed only when a property asks for it. `ProviderProcess` runs the provider
server at a realistic pace in a process of its own, so the client's load cannot slow its pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support.sse import parse_sse_bytes

_FAILURES = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass
class Reply:
    """One request as the client saw it; times in seconds from just before it was sent."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    started: float = 0.0  # time.monotonic() when sent
    ttft_s: float = math.nan  # the first `token` event arrived
    total_s: float = math.nan  # the whole response was read
    client_error: str = ""  # the connection failed or timed out
    version: str = "HTTP/1.1"

    @cached_property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        if self.status != 200 or "event-stream" not in self.headers.get("content-type", ""):
            return []
        try:
            return parse_sse_bytes(self.body, skip=("token",))
        except ValueError:
            return []

    def data(self, name: str) -> dict[str, Any]:
        return next((d for n, d in self.events if n == name), {})

    @property
    def complete(self) -> bool:
        return any(n == "done" for n, _ in self.events)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete and not self.client_error

    @property
    def outcome(self) -> str:
        """meta.cache | "error:<code>" (SSE error) | "http:<status>:<code>" | "client:<exception>"."""
        if self.client_error:
            return f"client:{self.client_error.split(':', 1)[0]}"
        if self.status != 200:
            code = "?"
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = str(json.loads(self.body)["error"]["code"])
            return f"http:{self.status}:{code}"
        if error := self.data("error"):
            return f"error:{error.get('code')}"
        return str(self.data("meta").get("cache", "client:empty"))

    @property
    def error(self) -> str:
        if self.client_error:
            return self.client_error
        if self.status != 200:
            return self.body[:200].decode(errors="replace")
        return str(self.data("error").get("message", ""))

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("retry-after")

    @property
    def tokens(self) -> int:
        return sum(1 for n, _ in self.events if n == "token")

    @property
    def text(self) -> str:
        """The answer text (token events parsed in full)."""
        return "".join(str(d.get("text", "")) for n, d in parse_sse_bytes(self.body) if n == "token")

    @property
    def server_ttft_ms(self) -> float:
        value = self.data("done").get("ttft_ms")
        return math.nan if value is None else float(value)


class Client:
    """One keep-alive connection to `url` for sequential requests (re-opened after any failure)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = int(parts.port or 80)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def encode(self, method: str, path: str, body: bytes, close: bool) -> bytes:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{self.headers}"
            f"content-type: application/json\r\naccept: text/event-stream\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        return head.encode() + body

    async def request(
        self, method: str, path: str, json_body: Any = None, *, raw: bytes | None = None, limit_s: float = 60
    ) -> Reply:
        """One request; `raw` is a request pre-built with `encode` (the cheapest path)."""
        data = b"" if json_body is None else json.dumps(json_body).encode()
        message = raw if raw is not None else self.encode(method, path, data, close=False)
        reply = Reply(started=time.monotonic())
        try:
            async with asyncio.timeout(limit_s):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
                assert self._reader is not None
                self._writer.write(message)
                await self._read(self._reader, reply)
            if reply.headers.get("connection", "").lower() == "close" or reply.version == "HTTP/1.0":
                self.close()
        except _FAILURES as exc:
            reply.client_error = f"{type(exc).__name__}: {exc}"[:200]
            self.close()
        reply.total_s = time.monotonic() - reply.started
        return reply

    async def _read(self, reader: asyncio.StreamReader, reply: Reply) -> None:
        """Read one response (Content-Length, chunked, or until close)."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        reply.version, reply.status = lines[0].split()[0], int(lines[0].split()[1])
        reply.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        if "content-length" in reply.headers:
            reply.body = await reader.readexactly(int(reply.headers["content-length"]))
            if b"event: token" in reply.body:
                reply.ttft_s = time.monotonic() - reply.started
        elif "chunked" not in reply.headers.get("transfer-encoding", "").lower():
            reply.body = await reader.read()
        else:
            parts: list[bytes] = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunk = (await reader.readexactly(size + 2))[:-2]
                if math.isnan(reply.ttft_s) and b"event: token" in chunk:
                    reply.ttft_s = time.monotonic() - reply.started
                parts.append(chunk)
            await reader.readuntil(b"\r\n")  # no trailers
            reply.body = b"".join(parts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def fetch(
    url: str,
    method: str,
    path: str,
    json_body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    limit_s: float = 120,
) -> Reply:
    """One request on a connection of its own, closed afterwards (as many independent clients would)."""
    client = Client(url, headers)
    data = b"" if json_body is None else json.dumps(json_body).encode()
    try:
        return await client.request(method, path, raw=client.encode(method, path, data, close=True), limit_s=limit_s)
    finally:
        client.close()


# ------------------------------------------------------------------ the model stand-in, in a process of its own

_FILLER_TEXT = (
    "the passage describes this in some detail and adds context that a reader would want including the usual "
    "conditions exceptions and a short example so that the answer stays grounded in the retrieved text"
)
_FILLER = _FILLER_TEXT.split()
ROOT = Path(__file__).resolve().parents[2]


def realistic_answer(tokens: int) -> Any:
    """A `Behavior.text` callable: a deterministic answer of exactly `tokens` words citing [1] and [2]."""
    from tests.support.provider_server import default_answer

    def answer(body: Mapping[str, Any]) -> str:
        words = default_answer(body).split()
        seed = int(hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:8], 16)
        i = 0
        while len(words) < tokens - 1:
            words.append(_FILLER[(seed + i * 7) % len(_FILLER)])
            i += 1
            if i % 23 == 0:
                words[-1] += f" [{1 + (seed + i) % 2}]."
        return " ".join([*words[: tokens - 1], "[2]."])

    return answer


class ProviderProcess:
    """The loopback `ProviderServer` in a process of its own (the client's load cannot slow its pacing).

    `reset()` forgets recorded calls; `calls()` returns the generation calls since. With `oracle` (a JSON
    file mapping normalised questions to a group), semantic verification calls are answered "yes" exactly
    when both questions are in the same group: a verifier that is always right.
    """

    def __init__(
        self, first_token_delay: float, token_interval: float, answer_tokens: int, oracle: Path | None = None
    ) -> None:
        self.args = [str(first_token_delay), str(token_interval), str(answer_tokens), str(oracle or "")]
        self.base_url = ""
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ProviderProcess:
        pipe = asyncio.subprocess.PIPE
        cmd = [sys.executable, "-m", "tests.support.load", "provider", *self.args]
        self._proc = await asyncio.create_subprocess_exec(*cmd, cwd=str(ROOT), stdin=pipe, stdout=pipe, limit=1 << 26)
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the provider server process did not start")
        self.base_url = json.loads(line)["base_url"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self._command("quit")
        try:
            await asyncio.wait_for(self._proc.wait(), 15)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()

    async def _command(self, name: str) -> Any:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{name}\n".encode())
        await asyncio.wait_for(self._proc.stdin.drain(), 30)
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the provider server process closed its output")
        return json.loads(line)

    async def reset(self) -> None:
        await self._command("reset")

    async def calls(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._command("calls")
        return result


def _oracle(path: str, answer: Callable[[Mapping[str, Any]], str]) -> Callable[[Mapping[str, Any]], str]:
    """Answers: `answer(body)`; verification calls: yes when both questions of the prompt are in one group."""
    from service.policy.guardrails import normalize_for_key
    from service.policy.semantic_verify import QUESTION_A, QUESTION_B, VERIFY_SYSTEM

    groups: dict[str, str] = json.loads(Path(path).read_text()) if path else {}

    def text(body: Mapping[str, Any]) -> str:
        if VERIFY_SYSTEM not in str(body.get("system")):
            return answer(body)
        a, b, *_ = str(body["messages"][0]["content"]).splitlines()
        same = groups.get(normalize_for_key(a.removeprefix(QUESTION_A)), "?a") == groups.get(
            normalize_for_key(b.removeprefix(QUESTION_B)), "?b"
        )
        return "yes" if same else "no"

    return text


def _provider_main(first_token_delay: str, token_interval: str, answer_tokens: str, oracle: str = "") -> None:
    from service.policy.semantic_verify import VERIFY_SYSTEM
    from tests.support.provider_server import Behavior, ProviderServer

    text = _oracle(oracle, realistic_answer(int(answer_tokens)))
    behavior = Behavior(text=text, first_token_delay=float(first_token_delay), token_interval=float(token_interval))
    with ProviderServer() as server:
        server.default = behavior
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                server.reset()
                server.default = behavior
                print("{}", flush=True)
            elif line.strip() == "calls":
                generations = [c for c in server.calls if c.route in ("messages", "chat.completions")]
                calls = [
                    {
                        "text": c.text if i == 0 else None,  # the first answer in full, the rest by digest
                        "text_sha256": hashlib.sha256(c.text.encode()).hexdigest(),
                        "verify": VERIFY_SYSTEM in str(c.body.get("system")),
                        "tokens_sent": c.tokens_sent,
                        "first_token_s": None if c.first_token_at is None else c.first_token_at - c.started_at,
                        "duration_s": None if c.finished_at is None else c.finished_at - c.started_at,
                    }
                    for i, c in enumerate(generations)
                ]
                print(json.dumps(calls), flush=True)
            else:
                print("{}", flush=True)
                break


if __name__ == "__main__" and len(sys.argv) in (5, 6) and sys.argv[1] == "provider":
    _provider_main(*sys.argv[2:])
