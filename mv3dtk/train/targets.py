"""The global term's targets for the statement modes of ``--global-text`` (``statement``, ``mixed``,
``statements``): which text each volume is aligned with at a step, and which texts count as its positives.

A statement is known by a stable 64-bit id of its text (:func:`text_hash`), so that texts gathered from
every rank can be matched with what is true of each volume without sending strings between processes.
"""

from __future__ import annotations

import hashlib
import random

import torch

from ..text.labeler import split_sentences

STATEMENT_MODES = ("statement", "mixed", "statements")
MAX_STATEMENTS = 64  # per volume, for the positives of the global term (more are rare and ignored)


def text_hash(text: str) -> int:
    """A stable 64-bit id of a text (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8).digest(), "little", signed=True)


EMPTY_ID = text_hash("")  # pads the statement ids; never a positive


def global_texts(batch: dict, mode: str, seed: int, step: int) -> list[str]:
    """The text each volume of ``batch`` is aligned with by the global term (B,); for
    ``statements``, the batch's distinct statements (T,) (:func:`batch_statements`).

    ``report``: its source report (the paper). ``enriched``: the whole enriched report. ``statement``:
    one sentence of the enriched report, drawn afresh at every step (CXR-CLIP style), so that the image
    meets single presence/absence statements, the form zero-shot prompts take. ``mixed``: either, with
    even odds. Draws depend only on (seed, step, volume), so a resumed or distributed run repeats them."""
    if mode == "statements":
        return batch_statements(batch)
    if mode == "report":
        return list(batch["report"])
    if mode == "enriched":
        return list(batch["enriched"])
    out = []
    for i, text in zip(batch["index"].tolist(), batch["enriched"]):
        rng = random.Random(f"{seed}:{step}:{i}")
        sentences = split_sentences(text)
        whole = not sentences or (mode == "mixed" and rng.random() < 0.5)
        out.append(text if whole else rng.choice(sentences))
    return out


def batch_statements(batch: dict) -> list[str]:
    """``--global-text statements``: every distinct sentence of the batch's enriched reports, in order
    of first appearance (1 <= T < B * MAX_STATEMENTS). The global term then aligns each volume with all
    of its own statements at once (:func:`mv3dtk.train.losses.set_nce`), a dense signal per step.
    Only the sentences :func:`statement_ids` knows as true are used; a batch without any gives the
    empty text, which the loss drops (its id is the padding's)."""
    keep = MAX_STATEMENTS - 1  # statement_ids stores the whole text's id, then this many sentences
    return list(dict.fromkeys(x for text in batch["enriched"] for x in split_sentences(text)[:keep])) or [""]


def first_of_each(ids: torch.Tensor) -> torch.Tensor:
    """ids (T,) int64 -> (T,) bool: the first occurrence of each id that is not the padding's."""
    _, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(len(ids), device=ids.device)
    first = torch.full((int(inverse.max()) + 1 if len(ids) else 0,), len(ids), device=ids.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return (first[inverse] == pos) & (ids != EMPTY_ID)


def pad_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids (T,) int64 -> (T + n,) padded with EMPTY_ID (exactly: F.pad's value is a float, which
    would round a 64-bit id)."""
    return torch.cat([ids, torch.full((n,), EMPTY_ID, dtype=ids.dtype, device=ids.device)])


def distinct_statements(text: torch.Tensor, ids: torch.Tensor, true_ids: torch.Tensor):
    """Gathered statement embeddings text (N, E) with their ids (N,) (padding and repeats across ranks
    included), and what is true of each volume true_ids (B, K) -> the distinct statements (T, E) and
    positives (B, T) bool: statement t is one of volume b's."""
    keep = first_of_each(ids)
    return text[keep], positives_from_ids(ids[keep], true_ids)


def global_targets(mode: str, text: torch.Tensor, ids: torch.Tensor, true_ids: torch.Tensor):
    """The global term's texts and positives for the statement modes: text (N, E) with their ids (N,)
    and true_ids (B, K) -> (texts (T, E), positives (B, T) bool). ``statements``: each distinct
    statement once (:func:`distinct_statements`). ``statement`` / ``mixed`` (paired, N = B): a
    statement true of several volumes is a positive for each of them, and each volume's own text is."""
    if mode == "statements":
        return distinct_statements(text, ids, true_ids)
    pos = positives_from_ids(ids, true_ids)  # (B, B)
    return text, pos | torch.eye(len(pos), dtype=torch.bool, device=pos.device)


def statement_ids(batch: dict, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids of the global texts (B,) int64, and of what is true of each volume (B, K) int64: its
    enriched report and each of its sentences, padded with the id of the empty text."""
    true = torch.full((len(batch["enriched"]), MAX_STATEMENTS), EMPTY_ID, dtype=torch.long)
    for i, enriched in enumerate(batch["enriched"]):
        ids = [text_hash(enriched)] + [text_hash(x) for x in split_sentences(enriched)]
        ids = ids[:MAX_STATEMENTS]
        true[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return torch.tensor([text_hash(t) for t in texts], dtype=torch.long), true


def positives_from_ids(text_ids: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
    """text_ids (T,), true_ids (B, K) -> (B, T) bool: global text j is one of volume i's statements.
    An empty text (the padding's id) is nobody's positive; with paired texts (T = B) the training
    loop adds the diagonal, so an empty text is still its own volume's."""
    return (true_ids[:, :, None] == text_ids[None, None, :]).any(1) & (text_ids != EMPTY_ID)[None, :]
