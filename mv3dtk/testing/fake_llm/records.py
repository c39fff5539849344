"""What the fake server records: one :class:`Request` per request received, and the chat paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .behaviours import Behaviour
from .replies import last_user

OLLAMA_CHAT = "/api/chat"
OPENAI_CHAT = "/v1/chat/completions"
CHAT_PATHS = (OLLAMA_CHAT, OPENAI_CHAT)


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
        return last_user(self.messages)

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started
