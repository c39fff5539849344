"""Token sequences for the VQA LLM, rendered by the LLM's own chat template, with an image sentinel.

A sequence is token ids plus labels. :data:`IMAGE` stands where the projected image tokens will be
spliced in (:mod:`mv3dtk.vqa.model`); :data:`IGNORE` marks a label the loss skips.

* :func:`encode_plain` is LLaVA's stage-1 "plain" format: ``BOS <image> report\\n EOS``, loss on the
  report and EOS.
* :func:`encode_conversation` renders CT-CHAT turns (``{"from": "human"|"gpt", "value": ...}``) with
  ``tokenizer.apply_chat_template`` one assistant turn at a time: the rendering of the history with the
  generation prompt is the prompt, and what the rendering with the answer adds to it is the answer span
  (answer + the template's end-of-turn token, e.g. ``<|eot_id|>``). Only answer spans are supervised,
  as CT-CHAT's ``preprocess_llama3`` does. Each piece is tokenized on its own (without the tokenizer's
  own BOS: the template writes it), so the prompt pieces are the same tokens whether a conversation is
  trained on or :func:`encode_prompt` asks for its next answer.
* :func:`truncate` cuts a sequence to the LLM's length budget, or drops it when nothing is left to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError

__all__ = ["IGNORE", "IMAGE", "IMAGE_TEXT", "Encoded", "encode_conversation", "encode_plain", "encode_prompt",
           "truncate"]

IMAGE = -200  # sentinel id: the projected image tokens go here (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE = -100  # label the loss skips (PyTorch's cross-entropy ignore_index)
IMAGE_TEXT = "<image>"  # where the image sits in a CT-CHAT / LLaVA question
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Encoded:
    """Token ids (with at most one :data:`IMAGE`) and their labels (same length; :data:`IGNORE` where
    nothing is learnt, the token id where it is)."""

    ids: list[int]
    labels: list[int]

    def __post_init__(self):
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} ids but {len(self.labels)} labels")


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _special_id(tokenizer, attr: str) -> int:
    value = getattr(tokenizer, f"{attr}_token_id", None)
    if value is None:
        raise ConfigError(f"the LLM's tokenizer has no {attr} token; use a Llama tokenizer that defines one")
    return int(value)


def encode_plain(tokenizer, report: str) -> Encoded:
    """LLaVA's stage-1 "plain" sample: ``[BOS] [IMAGE] tokens(report + "\\n") [EOS]``, supervised on the
    report tokens and EOS. Surrounding whitespace of ``report`` is dropped first."""
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    text = _tokens(tokenizer, str(report).strip() + "\n")
    return Encoded([bos, IMAGE, *text, eos], [IGNORE, IGNORE, *text, eos])


def _messages(turns: Sequence[dict[str, Any]], system: str | None) -> list[dict[str, str]]:
    """CT-CHAT turns -> chat-template messages (user/assistant), checked to alternate from a human turn."""
    if not turns:
        raise ConfigError("a conversation needs at least one turn")
    out = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        who = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        want = "human" if i % 2 == 0 else "gpt"
        if who != want or not isinstance(value, str):
            raise ConfigError(f"conversation turn {i} must be {{\"from\": \"{want}\", \"value\": \"...\"}} "
                              f"(turns alternate human/gpt from a human one), not {turn!r:.120}")
        out.append({"role": ROLES[who], "content": value})
    return out


def _render(tokenizer, messages: list[dict[str, str]], prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def _after(done: str, text: str, what: str) -> str:
    """What ``text`` adds to ``done``; a ConfigError when the template re-renders earlier messages."""
    if not text.startswith(done):
        k = next(i for i, (a, b) in enumerate(zip(done + "\0", text + "\0")) if a != b)
        raise ConfigError(f"the LLM's chat template renders a conversation differently once {what} is added "
                          f"(at character {k}: {done[k:k + 40]!r} becomes {text[k:k + 40]!r}), so prompts and "
                          "training sequences would not match. Use an LLM whose template renders messages "
                          "incrementally, as Llama-3's does")
    return text[len(done):]


def _pieces(tokenizer, messages: list[dict[str, str]], *, prompt: bool) -> list[tuple[str, bool]]:
    """(text, supervised) pieces: prompt, answer, prompt, answer, ... (and a final prompt for ``prompt``)."""
    pieces, done = [], ""
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:j], True)
        pieces.append((_after(done, head, "a question"), False))
        done = _render(tokenizer, messages[:j + 1], False)
        pieces.append((_after(head, done, "an answer"), True))
    if prompt:
        pieces.append((_after(done, _render(tokenizer, messages, True), "a question"), False))
    return pieces


def _encode(tokenizer, pieces: list[tuple[str, bool]]) -> Encoded:
    if sum(text.count(IMAGE_TEXT) for text, _ in pieces) > 1:
        raise ConfigError(f"a conversation may hold {IMAGE_TEXT} once (one volume per conversation); "
                          "this one (or the system prompt) holds it more often")
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in pieces:
        if supervised:
            if IMAGE_TEXT in text:
                raise ConfigError(f"{IMAGE_TEXT} belongs in a human turn, not in an answer")
            toks = _tokens(tokenizer, text)
            ids += toks
            labels += toks
            continue
        before, image, after = text.partition(IMAGE_TEXT)
        toks = _tokens(tokenizer, before) + ([IMAGE] if image else []) + _tokens(tokenizer, after)
        ids += toks
        labels += [IGNORE] * len(toks)
    return Encoded(ids, labels)


def encode_conversation(tokenizer, turns: Sequence[dict[str, Any]], *, system: str | None = None) -> Encoded:
    """A CT-CHAT conversation (alternating human/gpt turns, ``<image>`` in at most one human turn) as one
    training sequence: labels are :data:`IGNORE` except on each answer and its end-of-turn token(s). A
    trailing human turn without an answer is left out (nothing to learn from it)."""
    messages = _messages(turns, system)
    if messages[-1]["role"] == "user":
        messages = messages[:-1]
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError("a conversation to train on needs at least one answer (a gpt turn)")
    return _encode(tokenizer, _pieces(tokenizer, messages, prompt=False))


def encode_prompt(tokenizer, turns: Sequence[dict[str, Any]], *, system: str | None = None) -> list[int]:
    """The ids that ask for the answer to the last turn of ``turns`` (a human one), with the generation
    prompt: exactly the tokens that precede that answer in :func:`encode_conversation`."""
    messages = _messages(turns, system)
    if messages[-1]["role"] != "user":
        raise ConfigError("a prompt must end with a human turn (the question to answer)")
    return _encode(tokenizer, _pieces(tokenizer, messages, prompt=True)).ids


def truncate(enc: Encoded, max_length: int) -> Encoded | None:
    """The first ``max_length`` positions of ``enc``; None when the cut removes the :data:`IMAGE`
    sentinel or leaves no supervised label (the caller counts dropped samples)."""
    if max_length <= 0:
        return None
    if len(enc.ids) <= max_length:
        cut = enc
    else:
        cut = Encoded(enc.ids[:max_length], enc.labels[:max_length])
        if IMAGE in enc.ids and IMAGE not in cut.ids:
            return None
    if all(label == IGNORE for label in cut.labels):
        return None
    return cut
