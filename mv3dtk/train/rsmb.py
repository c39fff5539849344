"""The Radiology Semantic Matching Bank (RSMB; MedVista3D Algorithm 1).

A FIFO queue of previously seen **enriched** (LLM-rewritten) text embeddings. Each step:

1. the batch's enriched embeddings t̂ query the bank for their top-1 cosine neighbour t̂_NN
   (:meth:`SemanticBank.query`), which the semantic losses contrast with the image embeddings
   (``mv3dtk.train.losses``, eqs. 11–15);
2. after the step, the batch's t̂ are enqueued (:meth:`SemanticBank.enqueue`), overwriting the
   oldest entries.

Whether global and local (region sentence) embeddings share one bank or use two is the training
loop's choice; a shared bank fills mostly with region sentences (B·R of them per step).

State lives in buffers, so the bank follows ``.to(device)`` and is saved in ``state_dict`` /
checkpoints: ``queue`` (size, E) float (rows stored L2-normalised), ``ptr`` (long, next slot) and
``filled`` (long, number of valid rows; the valid rows are always ``queue[:filled]`` because the
queue is filled from slot 0 and only wraps once full). The bank never receives gradients: queries
run under ``no_grad`` and return detached copies; enqueued rows are detached.

Memory: 65,536 × 768 fp32 = 192 MB (per rank), plus N × ``chunk`` scores during a query.

Empty bank: :meth:`query` returns ``found`` all False (and zero rows); the semantic terms then skip
those samples, and with fewer than two found samples a term is a zero connected to the graph.

Distributed training: enqueue the embeddings **gathered over all ranks** (``dist.gather_nograd``),
in the same order on every rank, so that every rank holds the same bank. (If the bank is a
submodule of a DDP-wrapped model, DDP's buffer broadcast from rank 0 is then a no-op.) For region
sentences, whose valid count differs between ranks, gather the full (B, R, E) tensor and its (B, R)
mask, then select: ``bank.enqueue(gather_nograd(t_local)[gather_nograd(valid)])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SemanticBank"]


class SemanticBank(nn.Module):
    """FIFO bank of ``size`` L2-normalised ``dim``-dimensional embeddings with top-1 cosine look-up.

    Note: ``len(bank)`` is the number of filled rows, so an empty bank is falsy; test ``bank is None``
    rather than ``not bank``.
    """

    queue: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int = 65536, dim: int = 768, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"SemanticBank needs size ≥ 1 and dim ≥ 1, got size={size}, dim={dim}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("queue", torch.zeros(self.size, self.dim, dtype=dtype))  # (size, E)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={int(self.filled)}"

    def _check(self, t: Tensor) -> None:
        if t.dim() != 2 or t.shape[1] != self.dim:
            raise ValueError(f"SemanticBank(dim={self.dim}) expects (N, {self.dim}) embeddings, got {tuple(t.shape)}")

    @torch.no_grad()
    def query(self, t: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
        """Top-1 cosine neighbour of each row of t (N, E) among the filled rows.

        Returns ``nn`` (N, E) (detached copies of bank rows; zeros where not found) and ``found``
        (N,) bool (all False on an empty bank). The bank is scanned ``chunk`` rows at a time, so the
        score matrix never exceeds N × chunk; ties go to the lowest slot (as ``argmax``)."""
        self._check(t)
        n = t.shape[0]
        filled = int(self.filled)
        found = torch.full((n,), filled > 0, dtype=torch.bool, device=self.queue.device)
        if filled == 0 or n == 0:
            return self.queue.new_zeros(n, self.dim), found
        q = F.normalize(t.detach().to(device=self.queue.device, dtype=self.queue.dtype), dim=-1)  # (N, E)
        best = torch.full((n,), float("-inf"), dtype=q.dtype, device=q.device)  # (N,)
        idx = torch.zeros(n, dtype=torch.long, device=q.device)  # (N,)
        for start in range(0, filled, max(1, int(chunk))):
            block = self.queue[start:min(start + int(chunk), filled)]  # (C, E)
            score, j = (q @ block.T).max(dim=1)  # (N, C) -> (N,), (N,)
            better = score > best  # strict: keep the earliest slot on ties
            best = torch.where(better, score, best)
            idx = torch.where(better, j + start, idx)
        return self.queue[idx].clone(), found  # (N, E)

    @torch.no_grad()
    def enqueue(self, t: Tensor) -> None:
        """Append the rows of t (N, E), L2-normalised and detached, FIFO with wrap-around.

        Exactly as enqueuing the rows one at a time: row k goes to slot (ptr + k) mod size, so when
        N > size only the last ``size`` rows survive; then ptr ← (ptr + N) mod size and
        filled ← min(filled + N, size)."""
        self._check(t)
        n = t.shape[0]
        if n == 0:
            return
        rows = F.normalize(t.detach().to(device=self.queue.device, dtype=torch.float32), dim=-1)
        keep = min(n, self.size)
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(n - keep, n, device=self.queue.device)) % self.size  # (keep,), distinct
        self.queue.index_copy_(0, slots, rows[n - keep:].to(self.queue.dtype))
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))
