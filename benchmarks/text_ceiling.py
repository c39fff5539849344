"""The text side's ceiling for zero-shot detection (issue #6): how well CT-CLIP's prompt pairs can work
with a frozen text tower, whatever the image tower does.

The image is replaced by the best image embedding possible, a learnt linear map of the volume's true
label vector; it is trained CLIP-style (batch 16, the pretrain loss's global term, a learnt text
projection) against frozen features of the chosen global text, and then scored with the prompt pairs
on the valid split exactly as zero-shot scores an image. Also printed: the "raw" oracle, the report
features themselves scored against the prompt features with no training.

    .venv/bin/python benchmarks/text_ceiling.py PROJECT [--text-encoder minilm] [--steps 400]

Each mode is trained twice, with the paper's linear text projection and with the MLP one
(model config ``"text_proj": "mlp"``), side by side.

PROJECT needs prep/ and rewrite/ (e.g. the quickstart's DIR/project or benchmarks/learnability.py's).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", type=Path)
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=128, help="text tokens kept (vit-tiny's: 128)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import numpy as np
    import polars as pl
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from mv3dtk.data.ctrate import ABNORMALITIES
    from mv3dtk.text.zeroshot_prompts import ctclip_prompts
    from mv3dtk.models.text import TextEncoder, resolve_text_model
    from mv3dtk.models.medvista3d import text_projection
    from mv3dtk.train.targets import global_targets, global_texts, statement_ids
    from mv3dtk.train.losses import global_loss

    vols = pl.read_parquet(a.project / "prep" / "volumes.parquet").filter(pl.col("status") == "ok")
    rw = pl.read_parquet(a.project / "rewrite" / "reports.parquet", columns=["volume_id", "enriched"])
    vols = vols.join(rw, on="volume_id", how="left").sort("volume_id")
    vols = vols.with_columns(pl.coalesce("enriched", "report").alias("enriched"))
    labels = torch.tensor(vols.select(ABNORMALITIES).to_numpy(), dtype=torch.float32)  # (N, A)
    train = torch.tensor((vols["split"] == "train").to_numpy())
    valid = ~train
    path, opts = resolve_text_model(a.text_encoder)
    tower = TextEncoder(path, **{**opts, "max_length": a.max_length}).eval()
    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def features(texts: list[str]) -> torch.Tensor:  # (N, H)
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(new), 64):
            tok = tower.tokenize(new[i:i + 64])
            cache.update(zip(new[i:i + 64], tower(tok["input_ids"], tok["attention_mask"]).float()))
        return torch.stack([cache[t] for t in texts])

    pairs = ctclip_prompts(ABNORMALITIES)
    prompts = features([t for p in pairs for t in (p.positive, p.negative)]).view(len(pairs), 2, -1)  # (A, 2, H)

    def score(image: torch.Tensor, texts: torch.Tensor) -> float:  # image (N, E), texts (A, 2, E) -> mean AUROC
        y = labels[valid]
        aucs = [roc_auc_score(y[:, k], (image @ texts[k].T).softmax(-1)[:, 0]) for k in range(len(pairs))
                if 0 < y[:, k].sum() < len(y)]
        return float(np.mean(aucs))

    def ceiling(mode: str, proj: str) -> float:
        torch.manual_seed(a.seed)
        image_map = torch.nn.Linear(len(ABNORMALITIES), 64)
        text_proj = text_projection(prompts.shape[-1], 64, proj)
        log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        opt = torch.optim.AdamW([*image_map.parameters(), *text_proj.parameters(), log_scale], lr=1e-3,
                                weight_decay=0.05)
        rows = torch.nonzero(train)[:, 0]
        for step in range(a.steps):
            idx = rows[torch.randperm(len(rows))[:16]]
            batch = {"index": idx, "report": [vols["report"][int(i)] for i in idx],
                     "enriched": [vols["enriched"][int(i)] for i in idx]}
            texts = global_texts(batch, mode, a.seed, step)
            img = F.normalize(image_map(labels[idx]), dim=-1)
            txt = F.normalize(text_proj(features(texts)), dim=-1)
            pos = None
            if mode in ("statement", "mixed", "statements"):  # as the training loop builds them
                txt, pos = global_targets(mode, txt, *statement_ids(batch, texts))
            loss = global_loss(img, txt, log_scale.exp(), pos)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return score(F.normalize(image_map(labels[valid]), dim=-1), F.normalize(text_proj(prompts), dim=-1))

    raw = {"report": features(vols["report"].to_list()), "enriched": features(vols["enriched"].to_list())}
    print(f"{a.project}: {int(train.sum())} train / {int(valid.sum())} valid volumes, text tower {a.text_encoder}")
    print(f"{'--global-text':<14} {'raw oracle':>11} {'ceiling, linear':>16} {'ceiling, mlp':>13}")
    for mode in ("report", "enriched", "statement", "mixed", "statements"):
        r = f"{score(F.normalize(raw[mode][valid], dim=-1), F.normalize(prompts, dim=-1)):.3f}" if mode in raw else "-"
        print(f"{mode:<14} {r:>11} {ceiling(mode, 'linear'):>16.3f} {ceiling(mode, 'mlp'):>13.3f}")


if __name__ == "__main__":
    main()
