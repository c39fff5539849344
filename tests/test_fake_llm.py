"""mv3dtk.testing.fake_llm: a loopback Ollama/OpenAI chat server, driven here with the REAL clients.

The exception types asserted below are the ones the rewrite backend has to catch; if a client
upgrade changes them, these tests say so.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx  # required packages (pyproject): a broken install fails here, it is never skipped
import ollama
import openai
import pytest

from mv3dtk.testing.fake_llm import (
    Delay,
    Drop,
    Empty,
    FakeLLM,
    Garbage,
    Normal,
    Redirect,
    Reply,
    Status,
    default_reply,
    split_sentences,
)

pytestmark = pytest.mark.timeout(60)

MODEL = "fake-llm"
SYSTEM = "Rewrite the report into presence/absence statements, one sentence per finding."
REPORT = "Findings: No pleural effusion.  Mild atelectasis in the left lower lobe.\nHeart size is normal!"
REWRITTEN = "No pleural effusion. Mild atelectasis in the left lower lobe. Heart size is normal!"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": REPORT}]


def msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)


_OPEN: list = []  # clients made by oclient/aclient, closed after each test


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server
    assert server.errors == [], "\n".join(server.errors)


def oclient(llm, timeout: float = 5):
    _OPEN.append(ollama.Client(host=llm.url, timeout=timeout))
    return _OPEN[-1]


def aclient(llm, timeout: float = 5):
    _OPEN.append(openai.OpenAI(base_url=llm.openai_url, api_key="x", max_retries=0, timeout=timeout))
    return _OPEN[-1]


def ochat(client, text=REPORT, **kw):
    return client.chat(MODEL, msgs(text), **kw)["message"]["content"]


def achat(client, text=REPORT, **kw):
    return client.chat.completions.create(model=MODEL, messages=msgs(text), **kw).choices[0].message.content


# ---------------------------------------------------------------------------------------------
# import cost, default reply
# ---------------------------------------------------------------------------------------------


def test_import_does_not_load_clients_or_torch():
    code = ("import sys, mv3dtk.testing.fake_llm; "
            "print(sorted(m for m in ('ollama', 'openai', 'torch', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_reply_splits_sentences():
    assert split_sentences(REPORT) == [
        "No pleural effusion.", "Mild atelectasis in the left lower lobe.", "Heart size is normal!"]
    assert default_reply(MESSAGES) == REWRITTEN
    two_sections = "FINDINGS: Lungs clear. No nodule.\n\nImpression: Normal study."
    assert default_reply([{"role": "user", "content": two_sections}]) == "Lungs clear. No nodule. Normal study."
    # the LAST user message counts; OpenAI content parts are understood
    history = [{"role": "user", "content": "Old. Report."}, {"role": "assistant", "content": "Old."},
               {"role": "user", "content": [{"type": "text", "text": "New  report. Here."}]}]
    assert default_reply(history) == "New report. Here."
    assert default_reply([{"role": "system", "content": "x"}]) == ""


# ---------------------------------------------------------------------------------------------
# normal traffic with both clients
# ---------------------------------------------------------------------------------------------


def test_ollama_chat_stream_and_non_stream(llm):
    c = oclient(llm)
    r = c.chat(MODEL, MESSAGES, options={"temperature": 0, "seed": 1})
    assert r.message.content == REWRITTEN and r.message.role == "assistant"
    assert r.done and r.done_reason == "stop" and r.eval_count and r.total_duration is not None
    chunks = list(c.chat(MODEL, MESSAGES, stream=True, options={"temperature": 0, "seed": 1}))
    assert len(chunks) > 3 and chunks[-1].done and not any(ch.done for ch in chunks[:-1])
    assert "".join(ch.message.content for ch in chunks) == r.message.content

    first, second = llm.chat_requests()
    assert first.path == "/api/chat" and first.api == "ollama" and first.method == "POST"
    assert first.body["messages"] == MESSAGES  # incl. the system message, as sent
    assert first.body["options"] == {"temperature": 0, "seed": 1}
    assert first.body["stream"] is False and second.body["stream"] is True
    assert first.last_user_message == REPORT
    assert first.started <= first.finished <= second.started <= second.finished
    assert isinstance(first.behaviour, Normal) and first.status == 200
    # keep-alive: the stream and the JSON reply came over one connection
    assert first.peer == second.peer


def test_openai_chat_stream_and_non_stream(llm):
    c = aclient(llm)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, seed=42, max_tokens=256)
    assert r.choices[0].message.content == REWRITTEN and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, seed=42, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == REWRITTEN
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    first, second = llm.chat_requests()
    assert first.path == "/v1/chat/completions" and first.api == "openai"
    assert first.body["messages"] == MESSAGES
    assert (first.body["temperature"], first.body["seed"], first.body["max_tokens"]) == (0, 42, 256)
    assert "stream" not in first.body or first.body["stream"] is False
    assert second.body["stream"] is True
    assert first.headers["authorization"] == "Bearer x"
    assert first.peer == second.peer


def test_model_listing_and_health(llm):
    assert [m.model for m in oclient(llm).list().models] == ["fake-llm:latest"]
    assert [m.id for m in aclient(llm).models.list()] == ["fake-llm"]
    # an untagged name also answers to ":latest", as in Ollama
    assert ochat(oclient(llm)) == REWRITTEN
    assert oclient(llm).chat("fake-llm:latest", MESSAGES).message.content == REWRITTEN
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"Ollama is running"
    conn.close()
    assert [r.path for r in llm.requests if not r.is_chat] == ["/api/tags", "/v1/models", "/"]


def test_reply_callable_and_models():
    seen = []

    def reply(messages):
        seen.append(messages)
        return "Pleural effusion is absent."

    with FakeLLM(models=("llama3.1:8b", "qwen2.5"), reply=reply) as llm:
        assert oclient(llm).chat("llama3.1:8b", MESSAGES).message.content == \
            "Pleural effusion is absent."
        c = aclient(llm)
        assert c.chat.completions.create(model="qwen2.5", messages=MESSAGES).choices[0].message.content == \
            "Pleural effusion is absent."
        assert seen == [MESSAGES, MESSAGES]
        with pytest.raises(ollama.ResponseError) as e:
            oclient(llm).chat("fake-llm", MESSAGES)
        assert e.value.status_code == 404
    assert llm.errors == []


# ---------------------------------------------------------------------------------------------
# scripted failures
# ---------------------------------------------------------------------------------------------


def test_status_errors_in_each_api_format(llm):
    o, a = oclient(llm), aclient(llm)
    llm.script(Status(500), Status(500, "boom"), Status(500), Status(503), Status(429, retry_after=1))
    with pytest.raises(ollama.ResponseError) as e:
        ochat(o)
    assert e.value.status_code == 500 and e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(o.chat(MODEL, MESSAGES, stream=True))
    assert e.value.status_code == 500 and e.value.error == "boom"
    with pytest.raises(openai.InternalServerError) as e:
        achat(a)
    assert e.value.status_code == 500
    assert set(e.value.body) >= {"message", "type", "code"}  # OpenAI's {"error": {...}} shape
    with pytest.raises(openai.InternalServerError) as e:
        achat(a, stream=True)
    assert e.value.status_code == 503
    with pytest.raises(openai.RateLimitError):
        achat(a)
    assert llm.pending() == 0
    assert [r.status for r in llm.chat_requests()] == [500, 500, 500, 503, 429]
    assert json.loads(llm.chat_requests()[0].raw)["model"] == MODEL
    # the queue is empty: back to normal
    assert ochat(o) == REWRITTEN and achat(a) == REWRITTEN


def test_unknown_model_is_404_for_both(llm):
    with pytest.raises(ollama.ResponseError) as e:
        oclient(llm).chat("no-such-model", MESSAGES)
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(oclient(llm).chat("no-such-model", MESSAGES, stream=True))
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError) as e:
        aclient(llm).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_garbage_makes_both_clients_raise(llm, stream):
    llm.script(Garbage(), Garbage())
    # both clients let json.JSONDecodeError (a ValueError) escape, unwrapped
    with pytest.raises(json.JSONDecodeError):
        if stream:
            list(oclient(llm).chat(MODEL, MESSAGES, stream=True))
        else:
            ochat(oclient(llm))
    with pytest.raises(json.JSONDecodeError):
        if stream:
            list(aclient(llm).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
        else:
            achat(aclient(llm))


def test_garbage_of_the_wrong_shape(llm):
    llm.script(Garbage('{"unexpected": 1}'), Garbage('{"unexpected": 1}'))
    with pytest.raises(Exception) as e:  # pydantic ValidationError
        oclient(llm).chat(MODEL, MESSAGES)
    assert type(e.value).__name__ == "ValidationError"
    # the OpenAI client does NOT validate: it returns an object whose choices is None
    r = aclient(llm).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert r.choices is None


def test_delay_beyond_timeout(llm):
    llm.script(Delay(3600), Delay(3600))  # answered never (close() cuts them off)
    with pytest.raises(httpx.ReadTimeout):  # the ollama client does not wrap timeouts
        ochat(oclient(llm, timeout=0.3))
    with pytest.raises(openai.APITimeoutError):
        achat(aclient(llm, timeout=0.3))
    # both clients gave up on their own: the server was still delaying, nothing was answered
    assert [(type(r.behaviour), r.status, r.finished) for r in llm.chat_requests()] == [(Delay, None, None)] * 2


def test_latency_and_delay_within_timeout_then_normal():
    with FakeLLM(latency=0.1) as llm:
        llm.script(Delay(0.2))
        assert ochat(oclient(llm)) == REWRITTEN and ochat(oclient(llm)) == REWRITTEN
        delayed, normal = llm.chat_requests()
    assert isinstance(delayed.behaviour, Delay) and isinstance(normal.behaviour, Normal)
    # the server's own record: it held each reply at least as long as it was told to
    assert delayed.duration >= 0.3 and normal.duration >= 0.1
    assert llm.errors == []


def test_redirect_is_sent_as_told(llm):
    llm.script(Redirect("http://127.0.0.1:9/elsewhere"), Redirect("http://127.0.0.1:9/elsewhere", code=308))
    for code in (307, 308):
        conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=5)
        conn.request("POST", "/api/chat", body=json.dumps({"model": MODEL, "messages": MESSAGES}))
        r = conn.getresponse()
        assert (r.status, r.getheader("Location"), r.read()) == (code, "http://127.0.0.1:9/elsewhere", b"")
        conn.close()
    assert [r.status for r in llm.chat_requests()] == [307, 308]


def test_hold_keeps_requests_at_the_server_until_release(llm):
    llm.hold(after=1)  # the first request is answered, the next ones wait
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ochat, oclient(llm), f"Report {i}.") for i in range(3)]
        llm.wait_for(lambda: llm.held() == 2 and any(f.done() for f in futures), what="one answer, two held")
        assert sum(f.done() for f in futures) == 1 and llm.in_flight() == 2
        assert sorted(str(r.status) for r in llm.chat_requests()) == ["200", "None", "None"]
        llm.release()
        assert sorted(f.result() for f in futures) == ["Report 0.", "Report 1.", "Report 2."]
    assert llm.held() == 0 and ochat(oclient(llm)) == REWRITTEN  # released: later requests are not held
    with pytest.raises(TimeoutError, match="waited 0.1 s for never; the server saw 4 chat requests"):
        llm.wait_for(lambda: False, timeout=0.1, what="never")


def test_drop_is_a_connection_error(llm):
    llm.script(Drop(), Drop(), Drop())
    with pytest.raises(httpx.RemoteProtocolError):  # unwrapped by the ollama client
        ochat(oclient(llm))
    with pytest.raises(httpx.RemoteProtocolError):
        list(oclient(llm).chat(MODEL, MESSAGES, stream=True))
    with pytest.raises(openai.APIConnectionError) as e:
        achat(aclient(llm))
    assert not isinstance(e.value, openai.APITimeoutError)
    assert [r.status for r in llm.chat_requests()] == [None, None, None]
    assert all(r.finished is not None for r in llm.chat_requests())


def test_empty_and_reply(llm):
    o, a = oclient(llm), aclient(llm)
    invented = "Pneumothorax is present. No pleural effusion."
    llm.script(Empty(), Empty, Empty(), Reply(invented), Reply(invented))  # a class works too
    assert ochat(o) == ""
    assert "".join(ch.message.content for ch in o.chat(MODEL, MESSAGES, stream=True)) == ""
    assert achat(a) == ""
    assert ochat(o) == invented
    assert "".join(ch.choices[0].delta.content or ""
                   for ch in a.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)) == invented
    assert ochat(o) == REWRITTEN


def test_rule_applies_to_the_matching_message_only():
    def rule(last_user):
        return Status(500, "this report always fails") if "cursed" in last_user else None

    with FakeLLM(rule=rule) as llm:
        llm.script(Reply("scripted"))
        o = oclient(llm)
        with pytest.raises(ollama.ResponseError):
            ochat(o, "A cursed report.")
        # the rule decided: the scripted behaviour is still queued for the next request
        assert llm.pending() == 1
        assert ochat(o, "A fine report. Two sentences.") == "scripted"
        assert ochat(o, "A fine report.") == "A fine report."
        with pytest.raises(openai.InternalServerError):
            achat(aclient(llm), "Another cursed one.")
        assert [r.status for r in llm.chat_requests()] == [500, 200, 200, 500]
    assert llm.errors == []


def test_bad_requests(llm):
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=5)
    conn.request("POST", "/api/chat", body=b"{not json", headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "error" in json.loads(r.read())
    conn.request("GET", "/v1/nothing-here")  # same connection: keep-alive after an error
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["type"] == "not_found_error"
    conn.close()


# ---------------------------------------------------------------------------------------------
# concurrency, latency, binding, shutdown
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_concurrent_requests_overlap(api, llm):
    client = oclient(llm) if api == "ollama" else aclient(llm)
    call = ochat if api == "ollama" else achat
    llm.hold()  # nothing is answered until all 8 are at the server at once
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, client, f"Report number {i}. Finding {i}.") for i in range(8)]
        llm.wait_for(lambda: llm.held() == 8, what="8 requests at the server at once")
        llm.release()
        results = [f.result() for f in futures]
    assert results == [f"Report number {i}. Finding {i}." for i in range(8)]
    assert llm.in_flight_max() == 8
    chats = llm.chat_requests()  # the server's own timestamps: all 8 intervals overlap
    assert max(r.started for r in chats) < min(r.finished for r in chats)


def test_binds_loopback_only(llm):
    assert llm.url.startswith("http://127.0.0.1:")
    assert llm.openai_url == llm.url + "/v1"
    assert llm._server.socket.getsockname()[0] == "127.0.0.1"
    # reachable on loopback, not on another address of this machine (when it has one)
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("10.255.255.255", 1))  # no packet is sent
        other = probe.getsockname()[0]
        probe.close()
    except OSError:
        other = None
    if other and not other.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((other, llm.port), timeout=1).close()
    socket.create_connection(("127.0.0.1", llm.port), timeout=1).close()


def test_close_is_prompt_with_a_slow_request_in_flight():
    llm = FakeLLM().start()
    llm.script(Delay(3600))  # were close() to wait for it, the test would time out
    outcome = {}

    def slow():
        try:
            outcome["content"] = ochat(oclient(llm, timeout=60))
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    llm.wait_for(lambda: llm.in_flight() == 1, what="the slow request")
    llm.close()
    t.join(timeout=30)
    assert not t.is_alive(), "the client still waits: close() did not cut the slow request off"
    assert isinstance(outcome.get("error"), httpx.TransportError)
    (rec,) = llm.chat_requests()
    llm.wait_for(lambda: rec.finished is not None, what="the server side of the dropped request to end")
    assert rec.status is None  # dropped, never answered
    llm.close()  # idempotent
    with pytest.raises(ConnectionError):  # refused: the ollama client's own ConnectionError
        ochat(oclient(llm))
    assert llm.errors == []
