"""What the fake server does with one chat request: :class:`Normal`, :class:`Status`, :class:`Delay`,
:class:`Garbage`, :class:`Empty`, :class:`Reply`, :class:`Redirect` and :class:`Drop`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class Behaviour:
    """Base class of what the server does with one chat request."""

    def __repr__(self) -> str:  # dataclass subclasses override this
        return f"{type(self).__name__}()"


@dataclass(repr=True)
class Normal(Behaviour):
    """Answer normally (``reply`` callable or the default sentence split)."""


@dataclass(repr=True)
class Status(Behaviour):
    """Answer with HTTP ``code`` and an error body in the API's own format
    (Ollama ``{"error": msg}``, OpenAI ``{"error": {"message", "type", "param", "code"}}``)."""

    code: int = 500
    message: str | None = None
    retry_after: float | None = None  # sent as a Retry-After header when given


@dataclass(repr=True)
class Delay(Behaviour):
    """Sleep ``seconds`` (on top of ``latency``), then answer normally; use it to trigger client
    timeouts. The sleep is cut short by :meth:`FakeLLM.close` (the connection is then dropped)."""

    seconds: float = 1.0


@dataclass(repr=True)
class Garbage(Behaviour):
    """HTTP 200 with a body that is not valid JSON, framed like the normal reply would be
    (the whole body; one NDJSON line for an Ollama stream; one ``data:`` frame for an SSE stream)."""

    body: str = "<html><body>502 upstream said: this is not JSON {"


@dataclass(repr=True)
class Empty(Behaviour):
    """HTTP 200, a valid reply whose content is ``""``."""


@dataclass(repr=True)
class Reply(Behaviour):
    """HTTP 200 with exactly this content (e.g. one that invents a finding)."""

    text: str = ""


@dataclass(repr=True)
class Redirect(Behaviour):
    """HTTP ``code`` (a redirect) to ``location``, an absolute URL; e.g. a local server that would
    send the client, and the reports in its request body, to another machine."""

    location: str = "http://127.0.0.1:9/"
    code: int = 307


@dataclass(repr=True)
class Drop(Behaviour):
    """Read the request, then close the connection without sending any response."""


def as_behaviour(b: Any) -> Behaviour:
    """``b`` as a Behaviour instance (a Behaviour class is instantiated with its defaults)."""
    if isinstance(b, type) and issubclass(b, Behaviour):
        b = b()
    if not isinstance(b, Behaviour):
        raise TypeError(f"not a FakeLLM behaviour: {b!r}")
    return b
