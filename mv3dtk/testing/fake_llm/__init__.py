"""A fake LLM server on 127.0.0.1 that speaks Ollama's and OpenAI's chat APIs, for tests.

It is a real HTTP/1.1 server (standard library only), so the real ``ollama`` and ``openai``
clients can be pointed at it::

    from mv3dtk.testing.fake_llm import FakeLLM, Status, Delay

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
:class:`Reply`, :class:`Redirect` and :class:`Drop`. An unknown model gets a 404 in the API's own
error format (unless the behaviour is Status, Redirect, Garbage or Drop, which win). ``latency`` is slept before every
chat reply (before the first chunk of a stream); :meth:`FakeLLM.close` interrupts it.

Gates replace sleeps in tests: :meth:`FakeLLM.hold` makes chat requests wait at the server (after
the first ``after`` of them) until :meth:`FakeLLM.release`; :meth:`FakeLLM.wait_for` polls a
condition with a deadline (e.g. ``llm.wait_for(lambda: llm.held() == 8)``: eight requests are at
the server at once). Each :class:`Request` records when it arrived and when it was answered.

Modules: :mod:`.behaviours` (what to do with a request), :mod:`.replies` (the default reply text),
:mod:`.records` (:class:`Request`), :mod:`.handler` (the HTTP side), :mod:`.server` (:class:`FakeLLM`).
Importing this package imports neither ``ollama``, ``openai`` nor ``torch``.
"""

from __future__ import annotations

from .behaviours import Behaviour, Delay, Drop, Empty, Garbage, Normal, Redirect, Reply, Status
from .records import Request
from .replies import default_reply, split_sentences
from .server import FakeLLM

__all__ = [
    "Behaviour",
    "Delay",
    "Drop",
    "Empty",
    "FakeLLM",
    "Garbage",
    "Normal",
    "Redirect",
    "Reply",
    "Request",
    "Status",
    "default_reply",
    "split_sentences",
]
