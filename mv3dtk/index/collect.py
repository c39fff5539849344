"""Which texts a project holds for the index: reports and region sentences from prep, their enriched
versions from rewrite, and the zero-shot prompts (the same strings zero-shot evaluation embeds)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import polars as pl

from ..errors import DataError, MissingInputError
from ..log import get_logger
from ..text.zeroshot_prompts import ctclip_prompts
from .store import ORIGINS, TextItem, make_item, parse_origins

REWRITE_FILES = {"enriched": "rewrite/reports.parquet", "region_enriched": "rewrite/region_texts.parquet"}


def select_origins(project_root: Path, origins: Sequence[str] | None, log=None) -> tuple[str, ...]:
    """The origins to build. Left out (None), the rewrite origins are skipped with a warning when
    ``mv3d rewrite`` has not run; asked for explicitly, their absence is an error."""
    log = log or get_logger("index-texts")
    explicit = parse_origins(origins)
    chosen = []
    for origin in explicit or ORIGINS:
        rel = REWRITE_FILES.get(origin)
        if rel and not (project_root / rel).is_file():
            if explicit:
                raise MissingInputError(f"origin '{origin}' needs {rel}, which does not exist; run: "
                                        f"mv3d -P {project_root} rewrite (or leave '{origin}' out of --origins)")
            log.warning("%s is missing: origin '%s' skipped (run `mv3d rewrite` to index enriched texts)", rel, origin)
            continue
        chosen.append(origin)
    return tuple(chosen)


def _rows(path: Path, columns: list[str], where=None) -> list[tuple]:
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; run the stage that writes it (mv3d prep / mv3d rewrite)")
    try:
        df = pl.read_parquet(path, columns=columns)
    except Exception as e:  # polars raises several types for a torn or foreign file
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun the stage that writes it") from e
    if where is not None:
        df = df.filter(where)
    return list(df.sort(columns[:2]).iter_rows())


def _source_rows(root: Path, origin: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
    """(volume_id, region, label, text) of one origin, text possibly empty or None."""


    if origin == "report":
        rows = _rows(root / "prep/volumes.parquet", ["volume_id", "report", "status"], pl.col("status") == "ok")
        return [(v, None, None, t) for v, t, _ in rows]
    if origin == "enriched":
        return [(v, None, None, t) for v, t in _rows(root / REWRITE_FILES[origin], ["volume_id", "enriched"])]
    if origin == "region":  # sentences that prep could not assign to a region are not region texts
        rows = _rows(root / "prep/region_texts.parquet", ["volume_id", "region", "sentence"],
                     pl.col("region").is_not_null())
        return [(v, r, None, t) for v, r, t in rows]
    if origin == "region_enriched":
        rows = _rows(root / REWRITE_FILES[origin], ["volume_id", "region", "enriched"], pl.col("region").is_not_null())
        return [(v, r, None, t) for v, r, t in rows]
    return [(None, None, p.label, text) for p in ctclip_prompts() for text in (p.positive, p.negative)]


def collect_texts(project_root: str | os.PathLike, origins: Sequence[str] = ORIGINS
                  ) -> tuple[list[TextItem], dict[str, int]]:
    """The texts of ``origins`` in the project (unique by text_id) and, per origin, how many
    empty texts were skipped."""
    root, items, empty = Path(project_root), {}, {}
    for origin in origins:
        empty[origin] = 0
        for volume_id, region, label, text in _source_rows(root, origin):
            if text is None or not str(text).strip():
                empty[origin] += 1
                continue
            item = make_item(origin, str(text), volume_id, region, label)
            items.setdefault(item.text_id, item)
    return list(items.values()), empty


