"""The fake server's HTTP side: a threading HTTP/1.1 server and the request handler that speaks
Ollama's ``/api/chat`` (NDJSON stream or JSON) and OpenAI's ``/v1/chat/completions`` (JSON or SSE)."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from .behaviours import Delay, Drop, Empty, Garbage, Normal, Redirect, Reply, Status
from .records import CHAT_PATHS, OPENAI_CHAT, Request
from .replies import default_reply, prompt_words, stream_pieces

if TYPE_CHECKING:
    from .server import FakeLLM


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


class _Dropped(Exception):
    """Raised inside the handler to abandon the connection without a response."""


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection; ``fake`` is the :class:`FakeLLM` that owns it."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False
    request_queue_size = 128  # the default 5 drops SYNs under a burst of connects (1 s retransmit)

    fake: FakeLLM

    def handle_error(self, request, client_address) -> None:  # quiet, but keep real bugs
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, _Dropped)) or self.fake._closing.is_set():
            return
        self.fake.errors.append(traceback.format_exc())


class Handler(http.server.BaseHTTPRequestHandler):
    """Records every request on ``server.fake`` and answers it (chat requests as the chosen behaviour says)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small chunks must not wait for delayed ACKs (40 ms each)
    server_version = "FakeLLM/1.0"
    sys_version = ""
    server: Server

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
        if not fake._pass_gate():  # held by FakeLLM.hold() until the server closed
            self._drop()
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
        if isinstance(b, Redirect):
            self._sleep(fake.latency)
            self._send(b.code, b"", headers={"Location": b.location})
            return
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
        pieces = stream_pieces(text)
        prompt_n = prompt_words(body.get("messages"))
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
        pieces = stream_pieces(text)
        prompt_n = prompt_words(body.get("messages"))
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
