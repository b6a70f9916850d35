"""Optional OpenTelemetry tracing behind a facade that costs next to nothing when it is off.

Nothing else in the code base imports opentelemetry, and everything here works without it
(the `otel` extra). The app builds one `Tracing` from settings, or from a `TracerProvider` a
caller injects (tests, an app embedding ragcache); no global provider is ever set.

`Tracing.stream` opens the root span of one answer around the pipeline's event generator.
Inside it, `span(...)` and `detached_span(...)` open children; anywhere else (tracing off,
opentelemetry not installed, the ingest CLI) they are no-ops that cost one context look-up.
The tracer travels in the OpenTelemetry context next to the current span, so child spans
need no reference to the app.

Why the root wraps the generator instead of being a `with` inside it: an async generator is
resumed by whichever task iterates it (the request handler for the first event, the response
streamer for the rest), and a context attached in one task cannot be detached in another.
So the wrapper attaches the root's context around each step and detaches it before it yields.
For the same reason a `span(...)` block (which makes its span current) must not contain a
`yield`; code that yields inside a span (the provider call) uses `detached_span(...)`, which
is never made current: what happens inside it are events on it, not child spans.

Tasks started inside a step (the producer task that runs retrieval and generation) copy the
context, so their spans are children of the root in the same trace.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from service import __version__

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
except ImportError:  # neither the `otel` extra nor a library that brings the API along
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.trace import (
        TracerProvider as TracerProvider,
    )  # for annotations elsewhere: `create_app(tracer_provider=...)`

    from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = "ragcache"
ROOT_SPAN = "rag.request"
# Probes and scrapes: a span every few seconds that says nothing.
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})
Attribute = str | bool | int | float
E = TypeVar("E")

_TRACER_KEY = otel_context.create_key("ragcache-tracer") if AVAILABLE else "ragcache-tracer"


def _attributes(values: dict[str, Attribute | None]) -> dict[str, Attribute]:
    """Keyword arguments as span attributes: `rag.`-prefixed, None left out."""
    return {f"rag.{name}": value for name, value in values.items() if value is not None}


class Span:
    """A handle on a span; this base class is the no-op one, used whenever tracing is off."""

    __slots__ = ()
    recording = False

    def set(self, **attributes: Attribute | None) -> None:
        """Set `rag.<name>` attributes (None values are skipped)."""

    def event(self, name: str, **attributes: Attribute | None) -> None:
        """Add a timestamped event."""

    def error(self, description: str) -> None:
        """Mark the span failed without an exception (a fallback, an `error` event)."""


NOOP = Span()
_NOOP_CONTEXT: AbstractContextManager[Span] = nullcontext(NOOP)


class _Live(Span):
    __slots__ = ("_span",)
    recording = True

    def __init__(self, span: otel_trace.Span) -> None:
        self._span = span

    def set(self, **attributes: Attribute | None) -> None:
        self._span.set_attributes(_attributes(attributes))

    def event(self, name: str, **attributes: Attribute | None) -> None:
        self._span.add_event(name, _attributes(attributes))

    def error(self, description: str) -> None:
        self._span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, description))


def _tracer() -> otel_trace.Tracer | None:
    """The tracer of the traced request this code runs in, or None."""
    if not AVAILABLE:
        return None
    return cast("otel_trace.Tracer | None", otel_context.get_value(_TRACER_KEY))


def span(name: str, **attributes: Attribute | None) -> AbstractContextManager[Span]:
    """A child of the current span, current itself inside the block. No `yield` inside the block."""
    tracer = _tracer()
    if tracer is None:
        return _NOOP_CONTEXT
    return _CurrentSpan(tracer.start_as_current_span(name, attributes=_attributes(attributes)))


def detached_span(name: str, **attributes: Attribute | None) -> AbstractContextManager[Span]:
    """A child of the current span that is never made current: safe around a `yield`."""
    tracer = _tracer()
    if tracer is None:
        return _NOOP_CONTEXT
    return _DetachedSpan(tracer.start_span(name, attributes=_attributes(attributes)))


def current() -> Span:
    """The current span of a traced request (to annotate it), or the no-op span."""
    if _tracer() is None:
        return NOOP
    return _Live(otel_trace.get_current_span())


class _CurrentSpan:
    __slots__ = ("_manager",)

    def __init__(self, manager: AbstractContextManager[otel_trace.Span]) -> None:
        self._manager = manager

    def __enter__(self) -> Span:
        return _Live(self._manager.__enter__())

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return self._manager.__exit__(kind, exc, tb)  # records the exception and sets ERROR


class _DetachedSpan:
    __slots__ = ("_span",)

    def __init__(self, span: otel_trace.Span) -> None:
        self._span = span

    def __enter__(self) -> Span:
        return _Live(self._span)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            self._span.set_attribute("rag.cancelled", True)  # its consumer went away: not a failure
        elif exc is not None:
            _record(self._span, exc)
        self._span.end()


def _record(span: otel_trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, type(exc).__name__))


# --- the app's tracer ---------------------------------------------------------------------


def tracing_enabled(settings: Settings) -> bool:
    """`RAG_OTEL_ENABLED` when set; otherwise on exactly when `OTEL_EXPORTER_OTLP_ENDPOINT` is."""
    if settings.otel_enabled is not None:
        return settings.otel_enabled
    return settings.otel_exporter_otlp_endpoint is not None


class Tracing:
    """One app's tracing: off, or spans from an injected or a configured TracerProvider."""

    def __init__(self, provider: TracerProvider | None = None, *, owned: SDKTracerProvider | None = None) -> None:
        self._provider = provider
        self._owned = owned  # built here from settings: shut down (and flushed) with the app
        self._tracer = provider.get_tracer(SERVICE_NAME, __version__) if provider is not None and AVAILABLE else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_settings(cls, settings: Settings, provider: TracerProvider | None = None) -> Tracing:
        """The injected provider (its owner flushes and shuts it down), or an OTLP exporter when enabled."""
        if provider is not None:
            return cls(provider)
        if not tracing_enabled(settings):
            return cls()
        built = otlp_provider(settings)
        return cls(built, owned=built) if built is not None else cls()

    def stream(
        self,
        events: AsyncIterator[E],
        describe: Callable[[Span, E | BaseException], None] | None = None,
        **attributes: Attribute | None,
    ) -> AsyncIterator[E]:
        """`events` under a root span `rag.request`; `events` itself when tracing is off.

        `describe(span, item)` is shown each item, and the exception if one ends the stream,
        to put what they say on the root span.
        """
        if self._tracer is None:
            return events
        return self._traced(self._tracer, events, describe, _attributes(attributes))

    async def _traced(
        self,
        tracer: otel_trace.Tracer,
        events: AsyncIterator[E],
        describe: Callable[[Span, E | BaseException], None] | None,
        attributes: dict[str, Attribute],
    ) -> AsyncIterator[E]:
        root = tracer.start_span(ROOT_SPAN, attributes=attributes)
        handle = _Live(root)
        context = otel_context.set_value(_TRACER_KEY, tracer, otel_trace.set_span_in_context(root))
        try:
            while True:
                token = otel_context.attach(context)
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                if describe is not None:
                    describe(handle, item)
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            handle.set(cancelled=True)  # the consumer stopped listening (a client that left)
            raise
        except BaseException as exc:
            if describe is not None:
                describe(handle, exc)
            _record(root, exc)
            raise
        finally:
            try:
                close = getattr(events, "aclose", None)
                if close is not None:  # the pipeline's own clean-up, still inside the root span
                    token = otel_context.attach(context)
                    try:
                        await close()
                    finally:
                        otel_context.detach(token)
            finally:
                root.end()

    def fastapi_options(self) -> dict[str, Any]:
        """Keyword arguments for `FastAPI(...)`: its HTTP server spans on this provider, or nothing.

        FastAPI's native telemetry opens the server span (`POST /rag/stream`, continuing a caller's
        `traceparent`) and spans for the auth dependency and the endpoint, so `rag.request` sits
        under them. Its OpenTelemetry metrics and logs stay off: /metrics is Prometheus, and its
        logs carry exception messages, which can quote user input. Nothing is read from the
        environment (no `auto_configure`), and no global provider is used.
        """
        if not _fastapi_has_telemetry():
            return {}
        config = {
            "tracer_provider": self._provider if self.enabled else None,
            "tracing": self.enabled,
            "metrics": False,
            "logs": False,
            "auto_configure": False,
            "exclude": _untraced,
        }
        return {"telemetry": config}

    def shutdown(self) -> None:
        """Flush and stop a provider built from settings; an injected one is its owner's."""
        if self._owned is not None:
            self._owned.shutdown()


def _fastapi_has_telemetry() -> bool:
    """FastAPI's own OpenTelemetry support (`FastAPI(telemetry=...)`) exists in recent releases only."""
    try:
        return importlib.util.find_spec("fastapi.telemetry") is not None
    except ImportError:
        return False


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def otlp_provider(settings: Settings) -> SDKTracerProvider | None:
    """An SDK TracerProvider exporting over OTLP/HTTP in batches, or None without the `otel` extra."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SDKProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "tracing is enabled but the otel extra is not installed (pip install 'ragcache[otel]'): tracing off"
        )
        return None
    base = settings.otel_exporter_otlp_endpoint
    # Like the exporter's own reading of the variable: a base URL, traces go to /v1/traces under it.
    # Passed explicitly so that a value from `.env` works too; unset, the exporter's defaults apply.
    endpoint = f"{base.rstrip('/')}/v1/traces" if base else None
    provider = SDKProvider(resource=Resource.create({"service.name": SERVICE_NAME, "service.version": __version__}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info("tracing on: OTLP/HTTP to %s", endpoint or "the exporter's default endpoint")
    return provider
