"""The tracing facade outside a traced request, switched on by settings, and with opentelemetry missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

from service.observability import tracing
from service.settings import Settings
from tests.support.servers import ROOT


def test_the_facade_is_inert_outside_a_traced_request() -> None:
    with tracing.span("rag.anything", n=1) as span:
        assert span is tracing.NOOP and not span.recording
        span.set(x=1)
        span.event("e")
    with tracing.detached_span("rag.other") as other:
        assert other is tracing.NOOP
    assert tracing.current() is tracing.NOOP

    async def events() -> AsyncIterator[int]:
        yield 1

    stream = events()
    assert tracing.Tracing().stream(stream) is stream  # off: the pipeline's own generator, unwrapped


def test_tracing_is_enabled_by_the_setting_or_the_standard_endpoint(tmp_path: Any) -> None:
    def made(**values: Any) -> Settings:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    assert not tracing.tracing_enabled(made(otel_enabled=None, otel_exporter_otlp_endpoint=None))
    assert tracing.tracing_enabled(made(otel_enabled=None, otel_exporter_otlp_endpoint="http://127.0.0.1:4318"))
    assert not tracing.tracing_enabled(made(otel_enabled=False, otel_exporter_otlp_endpoint="http://127.0.0.1:4318"))
    assert tracing.tracing_enabled(made(otel_enabled=True, otel_exporter_otlp_endpoint=None))
    # A blank value in .env means unset, like every other setting.
    assert made(RAG_OTEL_ENABLED="", OTEL_EXPORTER_OTLP_ENDPOINT=" ").otel_enabled is None


def test_the_facade_works_without_opentelemetry() -> None:
    """With opentelemetry not importable (an older FastAPI does not need it), the facade imports and does nothing."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["opentelemetry"] = None  # every `import opentelemetry...` raises ImportError
        from service.observability import tracing
        import service.answer.generation  # opens spans; (the pipeline imports FastAPI, which needs the API itself)
        from service.settings import Settings

        assert not tracing.AVAILABLE
        with tracing.span("rag.x", a=1) as span:
            span.set(b=2)
            span.event("e")
            span.error("no")
        with tracing.detached_span("rag.y") as other:
            assert other is tracing.NOOP
        assert tracing.current() is tracing.NOOP
        on = Settings(_env_file=None, RAG_OTEL_ENABLED=True)
        assert tracing.tracing_enabled(on) and not tracing.Tracing.from_settings(on).enabled

        async def events():
            yield 1

        stream = events()
        off = tracing.Tracing.from_settings(on)
        assert off.stream(stream) is stream
        assert asyncio.run(anext(stream)) == 1
        off.shutdown()
        print("inert")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "inert"
    assert "otel extra is not installed" in done.stderr
