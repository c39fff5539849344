"""MedVista3D-LLaVA on the quickstart project (issue #18): stages 1 and 2 with a tiny Llama, then the four
CT-CHAT tasks on the valid split, beside a blind run and chance.

    make demo                                  # the quickstart project: demo/project, demo/ctrate
    .venv/bin/python benchmarks/vqa.py [--project demo/project] [--data demo/ctrate] [--epochs2 4]

* The encoder is the quickstart's pretrained model (``pretrain/quickstart/model``), frozen; its tokens
  are cached once (``vqa/features/``), average-pooled to ``--token-pool`` (default 2 4 4 = 32 tokens).
* The LLM is a tiny Llama (``mv3dtk.testing.tiny_llama``; ``--hidden``, ``--layers``) whose byte-level
  BPE is trained on the dataset's VQA texts, then pretrained as a plain language model on the train
  split's questions, answers and reports (``--lm-steps``): LLaVA starts from an LLM that knows its
  language. Every number here measures what the image tokens add for a small model in a few epochs, not
  what a real LLM reaches.
* **Questions.** Synth's VQA files ask three questions per scan; CT-RATE's ask dozens. ``--questions N``
  (default 8) adds, for every train and valid scan, one conversation of N short-answer and N multiple-choice
  turns drawn from the scan's labels with synth's own question makers (``synth_text.question_items``).
* **What the features hold.** A logistic regression per label on the mean image token (train scans) gives
  the valid macro AUC printed first: the most any LLM could read from these tokens.
* The **blind run** is the same training and evaluation with every image token zeroed: what the questions
  and the answer priors alone give. Chance: 0.25 for multiple choice, 0.5 for yes/no.
* Printed: per task BLEU-1, METEOR (with java), ROUGE-L, CIDEr, and the MC and yes/no accuracy of both
  runs; train tokens/s (LLM positions, image tokens included) and generated tokens/s.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path


class ZeroTokens:
    """A token cache that returns zeros of the same shape: the blind run."""

    def __init__(self, cache):
        self.cache = cache

    def read(self, volume_id):
        import torch

        return torch.zeros_like(self.cache.read(volume_id))

    def has(self, volume_id):
        return self.cache.has(volume_id)


def volume_labels(project):
    """{volume_id: {label: 0/1}} from prep's volumes.parquet (the CT-RATE label columns)."""
    import polars as pl

    from mv3dtk.data.synth_text import ABNORMALITIES

    df = pl.read_parquet(project / "prep" / "volumes.parquet", columns=["volume_id", *ABNORMALITIES])
    return {r["volume_id"]: {k: int(r[k]) for k in ABNORMALITIES} for r in df.drop_nulls().iter_rows(named=True)}


def drawn_questions(items, labels, n, seed, path):
    """One more conversation per scan of ``items``: ``n`` short-answer and ``n`` MC turns from its labels,
    written to ``path`` and read back as any VQA file is."""
    import json

    import numpy as np

    from mv3dtk.data.synth_text import question_items
    from mv3dtk.vqa.data import read_vqa

    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    scans = sorted({(it["image"], it["volume_id"]) for it in items if it["volume_id"] in labels})
    path.write_text(json.dumps([question_items(img, labels[v], rng, n) for img, v in scans]))
    return read_vqa(path)


def probe_auc(cache, labels, vols):
    """Macro AUC on the valid scans of a logistic regression per label on the train scans' mean image token."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    split = dict(zip(vols["volume_id"], vols["split"]))
    ids = {s: [v for v in labels if split.get(v) == s and cache.has(v)] for s in ("train", "valid")}
    x = {s: np.stack([cache.read(v).float().mean(0).numpy() for v in ids[s]]) for s in ids}  # (V, C)
    mu, sd = x["train"].mean(0), x["train"].std(0) + 1e-6
    aucs = []
    for name in next(iter(labels.values())):
        y = {s: np.array([labels[v][name] for v in ids[s]]) for s in ids}
        if len(set(y["train"])) < 2 or len(set(y["valid"])) < 2:
            continue
        clf = LogisticRegression(C=0.1, max_iter=2000).fit((x["train"] - mu) / sd, y["train"])
        aucs.append(roc_auc_score(y["valid"], clf.decision_function((x["valid"] - mu) / sd)))
    return float(np.mean(aucs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=Path("demo/project"))
    ap.add_argument("--data", type=Path, default=Path("demo/ctrate"), help="the synthetic CT-RATE root (its VQA JSON)")
    ap.add_argument("--model", default="pretrain/quickstart/model")
    ap.add_argument("--token-pool", type=int, nargs=3, default=[2, 4, 4])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs1", type=int, default=1)
    ap.add_argument("--epochs2", type=int, default=4)
    ap.add_argument("--questions", type=int, default=8,
                    help="extra short-answer and multiple-choice turns per scan, drawn from its labels (synth's "
                         "files hold three questions per scan, CT-RATE's dozens); 0: the files' questions only")
    ap.add_argument("--lm-steps", type=int, default=1500, help="language-model pretraining steps of the tiny Llama")
    ap.add_argument("--lr", type=float, default=1e-3, help="stage 1 lr, and stage 2 LoRA and projector lr")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N valid conversations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: more threads only contend, "
                                                          "30x slower on a busy 2-core box)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mv3d-vqa-bench"))
    a = ap.parse_args()
    if not (a.project / a.model / "config.json").is_file():
        raise SystemExit(f"{a.project / a.model} is missing: run `make demo` first (or pass --project/--data)")

    import torch

    torch.set_num_threads(a.threads)
    from mv3dtk.dist import DistInfo
    from mv3dtk.models.medvista3d import load_model
    from mv3dtk.testing.tiny_llama import make_tiny_llama, pretrain_tiny_llama
    from mv3dtk.vqa.chat import encode_conversation, encode_plain
    from mv3dtk.vqa.data import read_vqa, vqa_files
    from mv3dtk.vqa.evaluate import answer_items
    from mv3dtk.vqa.features import build_cache
    from mv3dtk.vqa.llm import load_llm
    from mv3dtk.vqa.metrics import score
    from mv3dtk.vqa.options import VqaTrainOptions
    from mv3dtk.vqa.train import Sample, StageTrainer, prepped_volumes, vqa_items

    logging.basicConfig(level=logging.WARNING)
    log = logging.getLogger("mv3d.bench")
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    vols = prepped_volumes(a.project)
    train_items = vqa_items([a.data], vols, "train", log)
    valid_items = vqa_items([a.data], vols, "valid", log)[:a.limit]
    captions = [(v, r) for v, r, s in zip(vols["volume_id"], vols["report"], vols["split"]) if s == "train" and r]
    labels = volume_labels(a.project)
    train_items += drawn_questions(train_items, labels, a.questions, 1, a.out / "questions-train.json")
    valid_items += drawn_questions(valid_items, labels, a.questions, 2, a.out / "questions-valid.json")

    t = time.perf_counter()
    encoder = load_model(a.project / a.model)
    needed = sorted({v for v, _ in captions} | {it["volume_id"] for it in train_items + valid_items})
    cache = build_cache(encoder, a.project, needed, pool=a.token_pool, batch_size=8, log=log)
    n_tok, dim = cache.read(needed[0]).shape
    print(f"token cache: {len(needed)} volumes x {n_tok} tokens x {dim} in {time.perf_counter() - t:.0f} s "
          f"({cache.directory})")
    print(f"linear probe of the mean image token (what the features hold): valid macro AUC "
          f"{probe_auc(cache, labels, vols):.3f} over the labels")

    texts = [t["value"] for f in vqa_files(a.data) for it in read_vqa(f) for t in it["conversations"]]
    llm_dir = make_tiny_llama(a.out / "llama", texts + [r for _, r in captions], seed=0, vocab_size=2000,
                              hidden_size=a.hidden, layers=a.layers)
    t = time.perf_counter()
    lm_texts = [turn["value"].replace("<image>\n", "") for it in train_items for turn in it["conversations"]]
    llm_dir = pretrain_tiny_llama(llm_dir, lm_texts + [r for _, r in captions], a.out / "lm", steps=a.lm_steps,
                                  batch_size=16, lr=1e-3)
    print(f"language-model pretraining: {a.lm_steps} steps in {time.perf_counter() - t:.0f} s")
    _, tok = load_llm(llm_dir)
    caption_samples = [Sample(v, encode_plain(tok, r)) for v, r in captions]
    vqa_samples = [Sample(it["volume_id"], encode_conversation(tok, it["conversations"])) for it in train_items]
    opts = VqaTrainOptions(llm=str(llm_dir), lora_r=128, lora_alpha=256, lr1=a.lr, lr2=a.lr, projector_lr=a.lr,
                           epochs1=a.epochs1, epochs2=a.epochs2, batch_size=a.batch_size, micro_batch=a.batch_size,
                           max_length=1024, checkpoint_every=10**9, seed=0)
    print(f"train: {len(caption_samples)} captions, {len(vqa_samples)} conversations; valid: {len(valid_items)} "
          f"conversations; tiny Llama hidden {a.hidden}, {a.layers} layers, vocab {len(tok)}")

    results = {}
    for name, feats in (("image", cache), ("blind", ZeroTokens(cache))):
        llm, _ = load_llm(llm_dir)
        speed = {}
        for stage, samples in (("1", caption_samples), ("2", vqa_samples)):
            trainer = StageTrainer(a.out / name / f"stage{stage}", stage, llm, dim, samples, feats, opts,
                                   {"bench": name}, DistInfo(), torch.device("cpu"), log)
            last = trainer.run()
            speed[stage] = last["tokens_per_s"]
            llm = trainer.base_llm()
        model = trainer.model.eval()
        t = time.perf_counter()
        rows = answer_items(model, tok, valid_items, feats, tasks=("long", "short", "mc", "report"),
                            max_new_tokens=a.max_new_tokens, batch_size=32)
        gen_s = time.perf_counter() - t
        generated = sum(len(tok.encode(r["prediction"], add_special_tokens=False)) + 1 for r in rows)
        results[name] = (score(rows), speed, generated / gen_s)

    per_task = results["image"][0]["per_task"]
    print(f"\n{'task':<7} {'n':>4} {'BLEU-1':>7} {'METEOR':>7} {'ROUGE-L':>8} {'CIDEr':>7}   (image run)")
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for task, m in per_task.items():
        print(f"{task:<7} {m['n']:>4} {f(m['bleu1']):>7} {f(m['meteor']):>7} {f(m['rouge_l']):>8} {f(m['cider']):>7}")
    print(f"\n{'accuracy':<10} {'image':>7} {'blind':>7} {'chance':>7}")
    for task, chance in (("mc", 0.25), ("short", 0.5)):
        img, blind = (results[r][0]["per_task"].get(task, {}).get("accuracy") for r in ("image", "blind"))
        print(f"{task:<10} {f(img):>7} {f(blind):>7} {chance:>7.2f}")
    _, speed, gen = results["image"]
    print(f"\ntrain tokens/s: stage 1 {speed['1']:.0f}, stage 2 {speed['2']:.0f}; generate tokens/s {gen:.0f}")


if __name__ == "__main__":
    main()
