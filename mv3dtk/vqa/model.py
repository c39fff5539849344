"""MedVista3D-LLaVA: cached image tokens -> a 2-layer MLP-GELU projector -> spliced into a Llama's input.

* :class:`Projector` is LLaVA-1.5's ``mlp2x_gelu``: Linear(C, H) -> GELU -> Linear(H, H), biases on, no
  norm, PyTorch's default initialisation. It stays a plain module outside the Hugging Face model (a
  ``PreTrainedModel`` subclass would re-initialise it in transformers 5).
* :func:`splice` puts the projected tokens where a sequence has the ``IMAGE`` sentinel, in
  ``inputs_embeds``; their labels are ``IGNORE``. Sequences are right-padded (attention 0, label IGNORE).
* :meth:`VqaModel.loss_sum` is the summed next-token cross-entropy over supervised positions, so that a
  global batch split into micro-batches (and ranks) is normalised once by its total supervised tokens:
  accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .chat import IGNORE, IMAGE


class Projector(nn.Sequential):
    """(…, C) encoder tokens -> (…, H) LLM embeddings (LLaVA-1.5 ``mlp2x_gelu``)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.in_dim, self.hidden = int(in_dim), int(hidden)


def splice(embed: nn.Module, projector: nn.Module, ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
           feats: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: token ids with at most one ``IMAGE`` sentinel, their labels, and the image tokens
    (N_i, C) (None for a text-only sample) -> right-padded ``inputs_embeds`` (B, L, H),
    ``attention_mask`` (B, L) and ``labels`` (B, L), with the N_i projected image tokens in place of the
    sentinel (labels IGNORE there)."""
    weight = embed.weight
    rows, row_labels = [], []
    for seq, lab, f in zip(ids, labels, feats):
        seq_t = torch.as_tensor(list(seq), dtype=torch.long, device=weight.device)
        lab_t = torch.as_tensor(list(lab), dtype=torch.long, device=weight.device)
        at = (seq_t == IMAGE).nonzero().flatten()
        if len(at) > 1:
            raise ValueError("a sequence holds more than one image sentinel")
        if len(at) == 0:
            rows.append(embed(seq_t))  # (L, H)
            row_labels.append(lab_t)
            continue
        if f is None:
            raise ValueError("a sequence with an image sentinel needs image tokens")
        p = int(at[0])
        img = projector(f.to(weight.device, torch.float32)).to(weight.dtype)  # (N, H)
        rows.append(torch.cat([embed(seq_t[:p]), img, embed(seq_t[p + 1:])]))  # (L - 1 + N, H)
        row_labels.append(torch.cat([lab_t[:p], lab_t.new_full((len(img),), IGNORE), lab_t[p + 1:]]))
    length = max(len(r) for r in rows)
    hidden = rows[0].shape[-1]
    x = weight.new_zeros(len(rows), length, hidden)  # (B, L, H)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=weight.device)  # (B, L)
    y = torch.full((len(rows), length), IGNORE, dtype=torch.long, device=weight.device)  # (B, L)
    for i, (r, lab) in enumerate(zip(rows, row_labels)):
        x[i, :len(r)], mask[i, :len(r)], y[i, :len(r)] = r, 1, lab
    return x, mask, y


def supervised_tokens(labels: Sequence[Sequence[int]]) -> int:
    """Positions that contribute to the loss: labels that are not IGNORE, less the first position (it
    predicts nothing: the model shifts by one)."""
    return sum(sum(1 for y in lab[1:] if y != IGNORE) for lab in labels)


class VqaModel(nn.Module):
    """The LLM (plain, or a peft model with LoRA adapters) and the projector."""

    def __init__(self, llm: nn.Module, projector: Projector):
        super().__init__()
        self.llm, self.projector = llm, projector

    def embed(self, ids, labels, feats):
        return splice(self.llm.get_input_embeddings(), self.projector, ids, labels, feats)

    def loss_sum(self, ids, labels, feats) -> torch.Tensor:
        """Summed cross-entropy of the next token over the supervised positions of the micro-batch."""
        x, mask, y = self.embed(ids, labels, feats)
        logits = self.llm(inputs_embeds=x, attention_mask=mask, use_cache=False).logits  # (B, L, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=IGNORE,
                               reduction="sum")

    forward = loss_sum  # what DDP wraps

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], feats: Sequence[torch.Tensor | None], *, max_new_tokens: int,
                 stop_ids: Sequence[int], pad_id: int) -> list[list[int]]:
        """Greedy decoding of each prompt (ids with the image sentinel) -> the new token ids, without the
        stop token. Prompts are left-padded so that every sequence ends where generation starts."""
        x, mask, _ = self.embed(prompts, [[IGNORE] * len(p) for p in prompts], feats)
        lengths = mask.sum(1)
        shift = x.shape[1] - lengths  # right padding -> left padding, per row
        left_x, left_mask = torch.zeros_like(x), torch.zeros_like(mask)
        for i, s in enumerate(shift.tolist()):
            left_x[i, s:], left_mask[i, s:] = x[i, :x.shape[1] - s], 1
        out = self.llm.generate(inputs_embeds=left_x, attention_mask=left_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=list(stop_ids), pad_token_id=pad_id)
        stops = set(stop_ids)
        result = []
        for row in out.tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            result.append(row[:cut])
        return result
