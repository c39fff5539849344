"""Rewrite throughput: N synthetic reports through the Ollama backend against the local fake
server with a fixed per-request latency, at concurrency 1 and 8 (side by side, same run), and the
offline ``rules`` backend's reports per second.

Usage:  python benchmarks/rewrite.py [--n 500] [--latency 0.2] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def synthetic_reports(n: int, seed: int = 0) -> list[str]:
    from mv3dtk.data.synth import plan_findings, scan_labels
    from mv3dtk.data.synth_text import make_report

    out = []
    for i in range(n):
        labels = scan_labels(seed, 0, i)
        rng = np.random.default_rng([seed, i])
        found = {k: replace(f, size_mm=float(rng.integers(5, 13))) for k, f in plan_findings(labels, rng).items()}
        report = make_report(labels, found, 1.0, rng)  # sizes are normally set when drawn
        out.append(f"{report.findings} {report.impressions}")
    return out


def llm_run(texts: list[str], url: str, concurrency: int, tmp: Path) -> tuple[float, int]:
    from mv3dtk.text.backends import OllamaBackend
    from mv3dtk.text.cache import ReplyCache, cache_key
    from mv3dtk.text.prompts import prompt_sha
    from mv3dtk.text.rewrite import send_all

    backend = OllamaBackend(model="fake-llm", host=url, timeout=30)
    cache = ReplyCache(tmp / f"cache-{concurrency}.duckdb")
    todo = {cache_key("ollama", "fake-llm", prompt_sha(), t): t for t in texts}
    t0 = time.perf_counter()
    replies = send_all(backend, todo, cache, prompt_sha(), concurrency=concurrency, retries=2,
                       log=logging.getLogger("bench"))
    seconds = time.perf_counter() - t0
    cache.close()
    return seconds, sum(r.output is not None for r in replies.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    from mv3dtk.testing.fake_llm import FakeLLM
    from mv3dtk.text.labeler import rules_rewrite

    texts = list(dict.fromkeys(synthetic_reports(args.n)))  # unique: the cache would dedupe the rest
    words = np.mean([len(t.split()) for t in texts])
    print(f"{len(texts)} unique synthetic reports, {words:.0f} words on average; fake server latency "
          f"{args.latency * 1000:.0f} ms per request")
    t0 = time.perf_counter()
    for t in texts:
        rules_rewrite(t)
    rules_s = time.perf_counter() - t0
    print(f"rules backend: {len(texts) / rules_s:,.0f} reports/s ({rules_s * 1000 / len(texts):.2f} ms each)")
    with FakeLLM(latency=args.latency) as llm, tempfile.TemporaryDirectory() as tmp:
        results = {c: llm_run(texts, llm.url, c, Path(tmp)) for c in args.concurrency}
    base = results[args.concurrency[0]][0]
    print(f"{'concurrency':>11} {'seconds':>8} {'reports/s':>10} {'speed-up':>9} {'ok':>5}")
    for c, (s, ok) in results.items():
        print(f"{c:>11} {s:>8.1f} {len(texts) / s:>10.1f} {base / s:>8.2f}x {ok:>5}")
    if 1 in results and 8 in results:
        speed = results[1][0] / results[8][0]
        print(f"target: concurrency 8 >= 6x concurrency 1: {'PASS' if speed >= 6 else 'MISS'} ({speed:.2f}x)")


if __name__ == "__main__":
    main()
