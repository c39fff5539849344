"""Tiny, randomly initialised text models for tests and demos (never used by the product).

* :func:`train_wordpiece` learns a deterministic lowercase BERT WordPiece vocabulary from report text
  (:func:`learn_wordpiece_vocab` + :func:`wordpiece_tokenizer`);
* :func:`make_tiny_bert` writes a randomly initialised BERT with that vocabulary as a complete Hugging
  Face directory, which :class:`mv3dtk.models.text.TextEncoder` loads like any other text model.

``transformers`` is imported inside :func:`make_tiny_bert`, after the Hugging Face offline switches are
set (it reads them once, when first imported).
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import BertProcessing

from ..errors import ConfigError
from ..models.text import SETTINGS_FILE, SPECIAL_TOKENS, _offline

__all__ = ["learn_wordpiece_vocab", "make_tiny_bert", "seeded", "train_wordpiece", "wordpiece_tokenizer"]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` with torch's generator seeded (bit-identical weights for a seed), leaving the
    caller's random state as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build()
    finally:
        torch.random.set_rng_state(state)


# --------------------------------------------------------------------------- WordPiece vocabulary


def _word_counts(texts: Iterable[str]) -> Counter:
    norm = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(str(text))))
    return counts


def _pairs(seq: list[str]) -> Counter:
    return Counter(zip(seq, seq[1:]))


def _merge(seq: list[str], a: str, b: str) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(a + b[2:])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def learn_wordpiece_vocab(counts: dict[str, int], vocab_size: int, min_frequency: int = 2) -> list[str]:
    """A WordPiece vocabulary learnt like the tokenizers trainer (BPE merges with ``##``
    continuation pieces), but deterministic: ties go to the lexicographically smallest pair.

    (``tokenizers``' own WordPiece trainer breaks ties by hash order, so two runs on the same
    text give different vocabularies.)"""
    words = sorted(counts)
    freqs = [int(counts[w]) for w in words]
    seqs = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
    vocab = list(SPECIAL_TOKENS) + sorted({s for seq in seqs for s in seq} - set(SPECIAL_TOKENS))
    known = set(vocab)
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for p, n in _pairs(seq).items():
            pair_counts[p] += n * freqs[i]
            where[p].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    while heap and len(vocab) < vocab_size:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue  # stale entry
        if -neg < max(1, min_frequency):
            break
        token = a + b[2:]
        if token not in known:
            known.add(token)
            vocab.append(token)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b), ())):
            old = _pairs(seqs[i])
            seqs[i] = _merge(seqs[i], a, b)
            new = _pairs(seqs[i])
            for p in old.keys() | new.keys():
                delta = new.get(p, 0) - old.get(p, 0)
                if delta:
                    pair_counts[p] += delta * freqs[i]
                    changed.add(p)
                if p in new:
                    where[p].add(i)
                elif p in where:
                    where[p].discard(i)
        pair_counts.pop((a, b), None)
        for p in sorted(changed):
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
    return vocab


def wordpiece_tokenizer(vocab: list[str]) -> Tokenizer:
    """The BERT pipeline of ``tokenizers.BertWordPieceTokenizer`` (lowercase, [CLS] ... [SEP]) on ``vocab``."""
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.post_processor = BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, *, min_frequency: int = 2) -> Tokenizer:
    """A lowercase BERT WordPiece tokenizer (with [PAD] [UNK] [CLS] [SEP] [MASK]) trained on ``texts``.
    Deterministic: the same texts give the same vocabulary. At most ``vocab_size`` tokens."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"vocab_size {vocab_size} is too small")
    return wordpiece_tokenizer(learn_wordpiece_vocab(_word_counts(texts), vocab_size, min_frequency))


# --------------------------------------------------------------------------- tiny BERT


def make_tiny_bert(directory: str | Path, texts: Iterable[str], *, hidden: int = 64, layers: int = 2,
                   heads: int = 2, intermediate: int = 128, vocab_size: int = 2000, seed: int = 0,
                   max_position: int = 512) -> Path:
    """Write a randomly initialised BERT with a WordPiece vocabulary trained on ``texts`` as a complete
    Hugging Face directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    vocab.txt, special_tokens_map.json, mv3d_text.json). Same texts and seed -> identical files."""
    _offline()  # before transformers is imported: it reads the offline switches once, at import
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = train_wordpiece(texts, vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=max_position, **special)
    fast.save_pretrained(str(d))
    (d / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    if not (d / "special_tokens_map.json").exists():
        _write_json(d / "special_tokens_map.json", special)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_position, pad_token_id=tok.token_to_id("[PAD]"))
    model = seeded(seed, lambda: BertModel(config))
    model.save_pretrained(str(d))
    _write_json(d / SETTINGS_FILE, {"pooling": "mean", "max_length": min(256, max_position),
                                    "trust_remote_code": False, "name": f"tiny-bert-h{hidden}-l{layers}-s{seed}"})
    return d


def save_tiny_model(directory: str | Path, config_name: str, text_dir: str | Path, seed: int = 0,
                    perturb: float = 0.1) -> Path:
    """A saved mv3d model (``config_name``, e.g. ``unimiss-tiny`` or ``vit-tiny``, with the text tower at
    ``text_dir``) whose image tower is moved off its initialisation by ``perturb`` x N(0, 1) noise, as after
    pretraining: code that silently re-initialises it cannot pass for code that loads it."""
    import torch

    from ..models.factory import get_model_config
    from ..models.medvista3d import MedVista3D

    cfg = get_model_config(config_name)
    cfg["text"] = {"model": str(text_dir), "pooling": "mean", "max_length": 32}
    model = seeded(seed, lambda: MedVista3D(cfg))

    def move():
        with torch.no_grad():
            for p in model.image.parameters():
                p.add_(perturb * torch.randn_like(p))

    seeded(seed + 1, move)
    return model.save(directory)
