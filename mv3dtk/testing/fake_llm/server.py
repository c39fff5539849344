""":class:`FakeLLM`: the server's life cycle, its addresses, and the controls a test drives it with."""

from __future__ import annotations

import collections
import itertools
import socket
import threading
import time
from typing import Any, Callable, Iterable

from .behaviours import Behaviour, Normal, as_behaviour
from .handler import Handler, Server
from .records import Request


class FakeLLM:
    """A loopback Ollama + OpenAI chat server. Use as a context manager (or ``start()``/``close()``).

    ``models``: model names served (Ollama also accepts ``name:latest`` for an untagged name).
    ``latency``: seconds slept before every chat reply. ``reply``: ``messages -> content``
    (default: :func:`default_reply`). ``rule``: ``last user message -> Behaviour | None``,
    consulted before the :meth:`script` queue.
    """

    def __init__(
        self,
        *,
        models: Iterable[str] = ("fake-llm",),
        latency: float = 0.0,
        reply: Callable[[list[dict]], str] | None = None,
        rule: Callable[[str], Behaviour | None] | None = None,
    ) -> None:
        if isinstance(models, str):
            models = (models,)
        self.models: tuple[str, ...] = tuple(models)
        self.latency = float(latency)
        self.reply = reply
        self.rule = rule
        self.requests: list[Request] = []
        self.errors: list[str] = []  # tracebacks of unexpected server-side exceptions
        self._lock = threading.Lock()
        self._gate = threading.Condition(self._lock)
        self._hold_after: int | None = None  # None: the gate is open; else requests still let through
        self._held = 0
        self._releases = 0  # a held request goes on once this changes
        self._queue: collections.deque[Behaviour] = collections.deque()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._in_flight = 0
        self._in_flight_max = 0
        self._ids = itertools.count(1)
        self._created = int(time.time())
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeLLM":
        if self._server is not None:
            return self
        server = Server(("127.0.0.1", 0), Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FakeLLM:{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; pending slow requests are cut off (their connections dropped)."""
        server = self._server
        if server is None or self._closing.is_set():
            return
        self._closing.set()
        with self._gate:
            self._gate.notify_all()  # held requests: their connections are dropped
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> "FakeLLM":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "not started"
        return f"<FakeLLM {where} models={list(self.models)}>"

    # -- addresses ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeLLM is not started (use `with FakeLLM() as llm:` or .start())")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The Ollama host, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """The OpenAI ``base_url``, ``http://127.0.0.1:PORT/v1``."""
        return self.url + "/v1"

    # -- test controls -----------------------------------------------------------------------

    def script(self, *behaviours: Behaviour | type[Behaviour]) -> "FakeLLM":
        """Queue behaviours, consumed one per chat request (not decided by ``rule``), in order."""
        bs = [as_behaviour(b) for b in behaviours]
        with self._lock:
            self._queue.extend(bs)
        return self

    def pending(self) -> int:
        """How many scripted behaviours are still queued."""
        with self._lock:
            return len(self._queue)

    def hold(self, *, after: int = 0) -> "FakeLLM":
        """Close the gate: the next ``after`` chat requests are answered as usual, every later one
        waits at the server (in flight, unanswered) until :meth:`release` or :meth:`close` (which
        drops its connection). Makes a client slow exactly where a test wants it, without sleeps."""
        with self._gate:
            self._hold_after = after
        return self

    def release(self) -> None:
        """Open the gate: held requests are answered, later ones are not held."""
        with self._gate:
            self._hold_after = None
            self._releases += 1
            self._gate.notify_all()

    def held(self) -> int:
        """How many chat requests are waiting at the gate now."""
        with self._lock:
            return self._held

    def in_flight(self) -> int:
        """How many chat requests are being served now (held ones included)."""
        with self._lock:
            return self._in_flight

    def wait_for(self, condition: Callable[[], bool], *, timeout: float = 30.0, what: str = "") -> None:
        """Poll ``condition()`` until it is true; after ``timeout`` seconds raise ``TimeoutError``
        saying ``what`` was awaited and what the server saw (a deadline, never a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"FakeLLM: waited {timeout:g} s for {what or repr(condition)}; the server saw "
                    f"{len(self.chat_requests())} chat requests, {self.in_flight()} in flight, "
                    f"{self.held()} held, {len(self.errors)} errors")
            time.sleep(0.01)

    def in_flight_max(self) -> int:
        """The largest number of chat requests that were being served at the same time."""
        with self._lock:
            return self._in_flight_max

    def chat_requests(self) -> list[Request]:
        """The chat requests (``/api/chat`` and ``/v1/chat/completions``), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.is_chat]

    def reset(self) -> None:
        """Forget recorded requests, queued behaviours and the concurrency maximum."""
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self._in_flight_max = self._in_flight

    # -- used by the handler -----------------------------------------------------------------

    def _record(self, rec: Request) -> None:
        with self._lock:
            self.requests.append(rec)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _pass_gate(self) -> bool:
        """Called by each chat request before it is answered; False if the server closed meanwhile."""
        with self._gate:
            if self._hold_after is None:
                return True
            if self._hold_after > 0:
                self._hold_after -= 1
                return True
            self._held += 1
            releases = self._releases
            try:
                while self._releases == releases and not self._closing.is_set():
                    self._gate.wait()
            finally:
                self._held -= 1
            return not self._closing.is_set()

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._in_flight_max = max(self._in_flight_max, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _choose(self, last_user: str) -> Behaviour:
        if self.rule is not None:
            b = self.rule(last_user)
            if b is not None:
                return as_behaviour(b)
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return Normal()

    def _has_model(self, model: Any) -> bool:
        if not isinstance(model, str):
            return False
        if model in self.models:
            return True
        base, _, tag = model.partition(":")
        if tag == "latest" and base in self.models:
            return True
        return ":" not in model and f"{model}:latest" in self.models

    def _tag(self, name: str) -> dict:
        full = name if ":" in name else f"{name}:latest"
        return {
            "name": full, "model": full, "modified_at": "2025-01-01T00:00:00Z", "size": 1,
            "digest": "0" * 64,
            "details": {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                        "parameter_size": "0B", "quantization_level": "F16"},
        }
