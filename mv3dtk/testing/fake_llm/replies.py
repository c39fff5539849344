"""The text side of a chat request: the last user message, the default "rewrite" reply, and the
pieces a streamed reply is cut into."""

from __future__ import annotations

import re
from typing import Any

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


def content_text(content: Any) -> str:
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


def last_user(messages: Any) -> str:
    """Text of the last ``user`` message in ``messages`` (``""`` when there is none)."""
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return content_text(m.get("content"))
    return ""


def default_reply(messages: list[dict]) -> str:
    """The default "rewrite": the last user message's sentences, joined by single spaces."""
    return " ".join(split_sentences(last_user(messages)))


def stream_pieces(text: str) -> list[str]:
    """Stream pieces: words with their trailing whitespace (they concatenate back to ``text``)."""
    if not text:
        return []
    parts = re.findall(r"\s*\S+\s*", text)
    return parts if "".join(parts) == text else [text]


def prompt_words(messages: Any) -> int:
    """Words in all messages' contents: the fake's prompt token count."""
    return sum(len(content_text(m.get("content")).split()) for m in messages or [] if isinstance(m, dict))
