"""Text index figures with the default encoder (all-MiniLM-L6-v2, offline):

1. encode throughput (texts/s) for synthetic reports and for region-sentence-sized texts;
2. ``build_index`` time for N unique texts (default 10,000: ~9 % reports, the rest region texts, the
   CT-RATE mix), and the incremental rebuild that finds nothing new;
3. single-query search latency over 100,000 stored embeddings: the torch path (matrix loaded once,
   one matmul + topk per query) that ``mv3d index-texts search`` uses, next to DuckDB's own
   brute-force scan (``list_cosine_similarity`` / ``array_inner_product`` ORDER BY LIMIT k).

Usage:  python benchmarks/index.py [--n 10000] [--stored 100000] [--queries 20]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(reports, region texts): ``n`` unique texts, about 1 report per 10 region texts. Region texts
    are pairs of report sentences (RadGenome region texts are a region's sentences joined)."""
    from rewrite import synthetic_reports

    n_reports = max(1, n * 9 // 100)
    reports = list(dict.fromkeys(synthetic_reports(n_reports * 2, seed)))[:n_reports]
    sentences = sorted({s.strip() for r in reports for s in re.split(r"(?<=\.)\s+", r) if s.strip()})
    rng, regions = random.Random(seed), {}
    while len(regions) < n - len(reports):
        a, b = rng.sample(sentences, 2)
        regions.setdefault(f"{a} {b}", None)
    return reports, list(regions)


def write_project(root: Path, reports: list[str], regions: list[str]) -> Path:
    import polars as pl

    (root / "prep").mkdir(parents=True)
    pl.DataFrame({"volume_id": [f"v{i}" for i in range(len(reports))], "status": "ok", "report": reports}
                 ).write_parquet(root / "prep/volumes.parquet")
    names = ["lung", "heart", "pleura", "aorta", "esophagus", "trachea and bronchie", "abdomen", "bone"]
    pl.DataFrame({"volume_id": [f"v{i % len(reports)}" for i in range(len(regions))],
                  "region": [names[i % len(names)] for i in range(len(regions))],
                  "anatomy": [names[i % len(names)] for i in range(len(regions))], "sentence": regions}
                 ).write_parquet(root / "prep/region_texts.parquet")
    return root


def throughput(enc, texts: list[str], batch_size: int = 64) -> float:
    enc.encode(texts[:8], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    enc.encode(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - t0)


def add_filler(db: Path, enc, n: int, seed: int = 0) -> None:
    """``n`` random unit vectors stored under ``enc``'s identity (search cost depends on the count,
    not on where the vectors came from)."""
    from mv3dtk.index import make_item, open_writer, register_encoder, write_embeddings

    rng = np.random.default_rng(seed)
    with open_writer(db) as con:
        register_encoder(con, enc)
        for s in range(0, n, 20_000):
            m = min(20_000, n - s)
            emb = rng.standard_normal((m, enc.dim), dtype=np.float32)  # (m, E)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            items = [make_item("region", f"filler sentence {s + i}.", f"f{s + i}", "lung") for i in range(m)]
            write_embeddings(con, enc, items, emb, [False] * m)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def search_figures(root: Path, enc, queries: list[str], k: int = 5) -> None:
    import duckdb
    import torch

    from mv3dtk.index import TextSearcher, index_path, search
    from mv3dtk.index.search import _encode_queries

    db = index_path(root)
    it = iter(queries * 10)
    one_shot = median_ms(lambda: search(root, next(it), encoder=enc, k=k), len(queries))
    enc_ms = median_ms(lambda: _encode_queries(enc, [queries[0]]), len(queries))
    q = enc.encode([queries[0]])[0].tolist()
    sql = ("SELECT text_sha, origin, scope, region, max(list_inner_product(embedding, ?::FLOAT[])) AS s FROM texts "
           "WHERE encoder = ? GROUP BY ALL ORDER BY s DESC LIMIT ?")

    def fresh_scan() -> None:  # a new connection reads the table from the OS cache, as a CLI call does
        with duckdb.connect(str(db), read_only=True) as fresh:
            fresh.execute(sql, [q, enc.identity, k]).fetchall()

    cold = median_ms(fresh_scan, 5)
    with duckdb.connect(str(db), read_only=True) as con:
        n, dim = con.execute("SELECT count(*), any_value(len(embedding)) FROM texts").fetchall()[0]
        scan = median_ms(lambda: con.execute(sql, [q, enc.identity, k]).fetchall(), 5)
    print(f"search over {n:,} stored {dim}-d embeddings (torch {torch.get_num_threads()} threads, the query "
          "encoded on 1):")
    print(f"  one query, search() = what `mv3d index-texts search` does once the model is loaded "
          f"(DuckDB scan grouped by text): {one_shot:.1f} ms median")
    print(f"    of which: encode the query {enc_ms:.1f} ms, DuckDB scan on a fresh connection {cold:.1f} ms "
          f"(on a warm one {scan:.1f} ms), the rest opening the file and fetching the hits' rows")
    t0 = time.perf_counter()
    searcher = TextSearcher(db, enc)
    load_ms = (time.perf_counter() - t0) * 1000
    warm = median_ms(lambda: searcher.search(next(it), k), len(queries))
    qv = enc.encode(queries)  # (Q, E)
    j = iter(range(10 ** 6))
    mm = median_ms(lambda: (searcher.matrix @ qv[next(j) % len(queries)]).topk(k), len(queries))
    batch = median_ms(lambda: (qv @ searcher.matrix.T).topk(k, dim=1), 5) / len(queries)
    mb = searcher.matrix.numel() * 4 / 1e6
    print(f"  TextSearcher (torch): load the matrix once {load_ms:.0f} ms ({mb:.0f} MB), "
          f"then one query {warm:.1f} ms median (matmul + topk {mm:.1f} ms; {len(queries)} queries batched "
          f"{batch:.2f} ms/query)")
    print(f"  DuckDB scan for {len(queries)} queries: ~{scan * len(queries) / 1000:.2f} s; torch after loading: "
          f"~{(load_ms + batch * len(queries)) / 1000:.2f} s")
    print(f"target: one query over {n:,} embeddings, matrix loaded once, < 200 ms: "
          f"{'PASS' if warm < 200 else 'MISS'} ({warm:.1f} ms); one query in a fresh process (search(), the CLI): "
          f"{one_shot:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="unique texts to build")
    ap.add_argument("--stored", type=int, default=100_000, help="embeddings to search over")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    import torch

    from mv3dtk.text.encoders import resolve_encoder
    from mv3dtk.index import build_index, index_path

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    enc = resolve_encoder("default", device="cpu")
    print(f"default encoder {enc.identity} ({enc.dim}-d, max {enc.max_length} tokens) loaded in "
          f"{time.perf_counter() - t0:.1f} s")
    reports, regions = corpus(args.n)
    print(f"encode throughput, batch 64: reports (~{np.mean([len(r) for r in reports]):.0f} chars): "
          f"{throughput(enc, reports[:128]):.1f} texts/s; region texts (~{np.mean([len(r) for r in regions]):.0f} "
          f"chars): {throughput(enc, regions[:1024]):.1f} texts/s")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_project(Path(tmp) / "p", reports, regions)
        s = build_index(root, encoder=enc, origins="report,region")
        print(f"build {s.encoded:,} unique texts ({len(reports):,} reports + {len(regions):,} region texts): "
              f"{s.seconds:.1f} s ({s.texts_per_s:.1f} texts/s encoding, {s.seconds - s.encode_seconds:.1f} s "
              f"reading, planning and writing)")
        again = build_index(root, encoder=enc, origins="report,region")
        print(f"incremental rebuild, nothing new: {again.seconds:.2f} s ({again.encoded} encoded)")
        db = index_path(root)
        t0 = time.perf_counter()
        add_filler(db, enc, max(0, args.stored - s.new_rows))
        print(f"added {max(0, args.stored - s.new_rows):,} filler embeddings in {time.perf_counter() - t0:.1f} s "
              f"(write_embeddings, arrow path); file {db.stat().st_size / 1e6:.0f} MB")
        queries = ["mild pleural thickening", "enlarged heart", "nodule in the right upper lobe",
                   "no pericardial effusion", "calcified plaques in the aorta"]
        search_figures(root, enc, [queries[i % len(queries)] for i in range(args.queries)])


if __name__ == "__main__":
    main()
