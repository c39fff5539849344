"""A fake LLM server on 127.0.0.1 that speaks Ollama's and OpenAI's chat APIs, for tests.

It is a real HTTP/1.1 server (standard library only), so the real ``ollama`` and ``openai``
clients can be pointed at it::

    from mv3dtk.fake_llm import FakeLLM, Status, Delay

    with FakeLLM(models=("llama3.1:8b",), latency=0.05) as llm:
        llm.script(Status(503), Delay(10))           # the next two chat requests misbehave
        client = ollama.Client(host=llm.url, timeout=5)
        ...                                          # or OpenAI(base_url=llm.openai_url, api_key="x")
        assert llm.chat_requests()[0].body["options"]["seed"] == 1

Endpoints: ``POST /api/chat`` (NDJSON stream by default, as real Ollama; JSON with
``"stream": false``), ``GET /api/tags``, ``POST /v1/chat/completions`` (JSON, or SSE with
``"stream": true``), ``GET /v1/models`` and ``GET /`` ("Ollama is running").

The reply to a chat request is decided, in this order, by

1. the ``rule`` hook (called with the last user message's text; ``None`` means "no opinion"),
2. the queue filled by :meth:`FakeLLM.script` (one behaviour consumed per chat request that the
   rule did not decide),
3. otherwise :class:`Normal`: the ``reply`` callable, or by default the last user message split
   into sentences (a "Findings:" heading removed) and joined by single spaces.

Behaviours: :class:`Normal`, :class:`Status`, :class:`Delay`, :class:`Garbage`, :class:`Empty`,
:class:`Reply` and :class:`Drop`. An unknown model gets a 404 in the API's own error format
(unless the behaviour is Status, Garbage or Drop, which win). ``latency`` is slept before every
chat reply (before the first chunk of a stream); :meth:`FakeLLM.close` interrupts it.

Importing this module imports neither ``ollama``, ``openai`` nor ``torch``.
"""

from __future__ import annotations

import collections
import http.server
import itertools
import json
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = [
    "Behaviour",
    "Delay",
    "Drop",
    "Empty",
    "FakeLLM",
    "Garbage",
    "Normal",
    "Reply",
    "Request",
    "Status",
    "default_reply",
    "split_sentences",
]

OLLAMA_CHAT = "/api/chat"
OPENAI_CHAT = "/v1/chat/completions"
CHAT_PATHS = (OLLAMA_CHAT, OPENAI_CHAT)


# --------------------------------------------------------------------------------------------
# Behaviours
# --------------------------------------------------------------------------------------------


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
class Drop(Behaviour):
    """Read the request, then close the connection without sending any response."""


def _as_behaviour(b: Any) -> Behaviour:
    if isinstance(b, type) and issubclass(b, Behaviour):
        b = b()
    if not isinstance(b, Behaviour):
        raise TypeError(f"not a FakeLLM behaviour: {b!r}")
    return b


# --------------------------------------------------------------------------------------------
# Default reply
# --------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^\s*(findings|impressions?|conclusions?)\s*:\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split a report into sentences; a leading "Findings:"/"Impression:"/"Conclusion:" is removed
    from each section, whitespace is collapsed."""
    out: list[str] = []
    for line in re.split(r"\n\s*\n|\n(?=\s*(?:findings|impressions?|conclusions?)\s*:)", text, flags=re.I):
        line = " ".join(_HEADING.sub("", line).split())
        for s in _SENTENCE_END.split(line):
            s = _HEADING.sub("", s).strip()
            if s:
                out.append(s)
    return out


def _content_text(content: Any) -> str:
    """Text of a message's content: a string, or OpenAI's list of ``{"type": "text", "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content
        )
    return str(content)


def _last_user(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return _content_text(m.get("content"))
    return ""


def default_reply(messages: list[dict]) -> str:
    """The default "rewrite": the last user message's sentences, joined by single spaces."""
    return " ".join(split_sentences(_last_user(messages)))


def _pieces(text: str) -> list[str]:
    """Stream pieces: words with their trailing whitespace (they concatenate back to ``text``)."""
    if not text:
        return []
    parts = re.findall(r"\s*\S+\s*", text)
    return parts if "".join(parts) == text else [text]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request the server received. ``headers`` keys are lower-cased; ``body`` is the parsed
    JSON (``None`` when there was no body or it was not JSON; ``raw`` has the bytes);
    ``started``/``finished`` are ``time.monotonic()`` values (``finished`` is ``None`` until the
    response has been sent or the connection dropped)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    started: float
    finished: float | None = None
    behaviour: Behaviour | None = None  # for chat requests: what was applied
    status: int | None = None  # HTTP status sent (None for Drop)
    peer: tuple[str, int] | None = None  # the client's (address, port): equal ports = one kept-alive connection

    @property
    def is_chat(self) -> bool:
        return self.path in CHAT_PATHS

    @property
    def api(self) -> str:
        return "openai" if self.path.startswith("/v1/") else "ollama"

    @property
    def messages(self) -> list[dict]:
        m = self.body.get("messages") if isinstance(self.body, dict) else None
        return m if isinstance(m, list) else []

    @property
    def last_user_message(self) -> str:
        return _last_user(self.messages)

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class _Dropped(Exception):
    """Raised inside the handler to abandon the connection without a response."""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False
    request_queue_size = 128  # the default 5 drops SYNs under a burst of connects (1 s retransmit)

    fake: "FakeLLM"

    def handle_error(self, request, client_address) -> None:  # quiet, but keep real bugs
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, _Dropped)) or self.fake._closing.is_set():
            return
        self.fake.errors.append(traceback.format_exc())


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small chunks must not wait for delayed ACKs (40 ms each)
    server_version = "FakeLLM/1.0"
    sys_version = ""
    server: _Server

    # -- plumbing ----------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status: int, payload: Any, *, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._rec.status = status
        self._complete()  # before the client can see the response: records are settled by then
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self._rec.status = 200

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_chunked(self) -> None:
        self._complete()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        self._complete()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.server.fake._closing.wait(seconds):
            self._drop()

    # -- dispatch ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        fake = self.server.fake
        raw = self._read_body()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self._rec = rec = Request(
            method=self.command,
            path=path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw=raw,
            started=time.monotonic(),
            peer=tuple(self.client_address[:2]),
        )
        fake._record(rec)
        self._chat_req = chat = path in CHAT_PATHS and self.command == "POST"
        self._completed = False
        if chat:
            fake._enter()
        try:
            if fake._closing.is_set():
                self._drop()
            if chat:
                self._chat(path, body, raw)
            else:
                self._other(path)
        except _Dropped:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug in the fake, or in a user's reply/rule callable: 500, recorded
            fake.errors.append(traceback.format_exc())
            self.close_connection = True
            if rec.status is None:
                try:
                    self._error(path.startswith("/v1"), 500, "FakeLLM internal error (see llm.errors)")
                except OSError:
                    pass
        finally:
            self._complete()

    def _complete(self) -> None:
        """Mark the request finished (and no longer in flight); called once, just before the
        last byte is sent, so that a client that got its answer sees a settled record."""
        if not self._completed:
            self._completed = True
            self._rec.finished = time.monotonic()
            if self._chat_req:
                self.server.fake._leave()

    def _other(self, path: str) -> None:
        fake = self.server.fake
        openai = path.startswith("/v1")
        if self.command in ("GET", "HEAD") and path == "/":
            self._send(200, "Ollama is running", content_type="text/plain; charset=utf-8")
        elif self.command in ("GET", "HEAD") and path == "/api/tags":
            self._send(200, {"models": [fake._tag(m) for m in fake.models]})
        elif self.command in ("GET", "HEAD") and path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": fake._created, "owned_by": "fake-llm"}
                for m in fake.models]})
        elif self.command in ("GET", "HEAD") and path == "/api/version":
            self._send(200, {"version": "0.0.0-fake"})
        else:
            self._error(openai, 404, f"{self.command} {path} not found", kind="not_found_error")

    def _error(self, openai: bool, code: int, message: str, *, kind: str | None = None,
               err_code: str | None = None, headers: dict[str, str] | None = None) -> None:
        if openai:
            kind = kind or _OPENAI_ERROR_TYPES.get(code) or (
                "server_error" if code >= 500 else "invalid_request_error")
            payload: Any = {"error": {"message": message, "type": kind, "param": None,
                                      "code": err_code}}
        else:
            payload = {"error": message}
        self._send(code, payload, headers=headers)

    # -- chat --------------------------------------------------------------------------------

    def _chat(self, path: str, body: Any, raw: bytes) -> None:
        fake = self.server.fake
        rec = self._rec
        openai = path == OPENAI_CHAT
        if not isinstance(body, dict):
            rec.behaviour = Normal()
            self._error(openai, 400, "invalid JSON request body" if raw else "missing request body")
            return
        b = fake._choose(rec.last_user_message)
        rec.behaviour = b
        model = body.get("model")
        stream = bool(body.get("stream", not openai))  # Ollama streams by default, OpenAI not

        if isinstance(b, Drop):
            self._drop()
        if isinstance(b, Status):
            msg = b.message or _STATUS_MESSAGES.get(b.code) or f"fake error {b.code}"
            hdrs = {"Retry-After": f"{b.retry_after:g}"} if b.retry_after is not None else None
            self._sleep(fake.latency)
            self._error(openai, b.code, msg, headers=hdrs)
            return
        if not isinstance(b, Garbage) and not fake._has_model(model):
            if openai:
                self._error(True, 404, f"model '{model}' not found", kind="not_found_error",
                            err_code="model_not_found")
            else:
                self._error(False, 404, f"model '{model}' not found")
            return

        self._sleep(fake.latency + (b.seconds if isinstance(b, Delay) else 0.0))

        if isinstance(b, Garbage):
            data = b.body.encode()
            if not stream:
                self._send(200, data)
            else:
                self._start_chunked("text/event-stream" if openai else "application/x-ndjson")
                self._chunk(b"data: " + data + b"\n\n" if openai else data + b"\n")
                self._end_chunked()
            return

        if isinstance(b, Reply):
            text = b.text
        elif isinstance(b, Empty):
            text = ""
        else:
            text = (fake.reply or default_reply)(body.get("messages") or [])
            if not isinstance(text, str):
                raise TypeError(f"FakeLLM reply callable returned {type(text).__name__}, not str")

        if openai:
            self._openai(body, model, text, stream)
        else:
            self._ollama(body, model, text, stream)

    def _ollama(self, body: dict, model: str, text: str, stream: bool) -> None:
        pieces = _pieces(text)
        prompt_n = sum(len(_content_text(m.get("content")).split())
                       for m in body.get("messages") or [] if isinstance(m, dict))
        stats = {
            "total_duration": int((time.monotonic() - self._rec.started) * 1e9),
            "load_duration": 1000,
            "prompt_eval_count": prompt_n,
            "prompt_eval_duration": 1000 * prompt_n,
            "eval_count": len(pieces),
            "eval_duration": 1000 * len(pieces),
        }
        if not stream:
            self._send(200, {
                "model": model, "created_at": _now_iso(),
                "message": {"role": "assistant", "content": text},
                "done": True, "done_reason": "stop", **stats})
            return
        self._start_chunked("application/x-ndjson")
        for p in pieces:
            self._chunk(_line({"model": model, "created_at": _now_iso(),
                               "message": {"role": "assistant", "content": p}, "done": False}))
        self._chunk(_line({"model": model, "created_at": _now_iso(),
                           "message": {"role": "assistant", "content": ""},
                           "done": True, "done_reason": "stop", **stats}))
        self._end_chunked()

    def _openai(self, body: dict, model: str, text: str, stream: bool) -> None:
        fake = self.server.fake
        cid = f"chatcmpl-fake{next(fake._ids)}"
        created = int(time.time())
        pieces = _pieces(text)
        prompt_n = sum(len(_content_text(m.get("content")).split())
                       for m in body.get("messages") or [] if isinstance(m, dict))
        usage = {"prompt_tokens": prompt_n, "completion_tokens": len(pieces),
                 "total_tokens": prompt_n + len(pieces)}
        if not stream:
            self._send(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage})
            return

        def chunk(delta: dict, finish: str | None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": model, "system_fingerprint": "fp_fake",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}]})

        self._start_chunked("text/event-stream")
        self._chunk(chunk({"role": "assistant", "content": ""}, None))
        for p in pieces:
            self._chunk(chunk({"content": p}, None))
        self._chunk(chunk({}, "stop"))
        so = body.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            self._chunk(_sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                              "model": model, "choices": [], "usage": usage}))
        self._chunk(b"data: [DONE]\n\n")
        self._end_chunked()


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_STATUS_MESSAGES = {
    429: "rate limit exceeded (fake)",
    500: "internal server error (fake)",
    502: "bad gateway (fake)",
    503: "server overloaded (fake)",
    504: "gateway timeout (fake)",
}


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


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
        self._queue: collections.deque[Behaviour] = collections.deque()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._in_flight = 0
        self._in_flight_max = 0
        self._ids = itertools.count(1)
        self._created = int(time.time())
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeLLM":
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
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
        bs = [_as_behaviour(b) for b in behaviours]
        with self._lock:
            self._queue.extend(bs)
        return self

    def pending(self) -> int:
        """How many scripted behaviours are still queued."""
        with self._lock:
            return len(self._queue)

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
                return _as_behaviour(b)
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

