"""The VQA LLM folder (mv3dtk.vqa.llm) and the tiny Llama test kit (mv3dtk.testing.tiny_llama): a tiny
Llama loads and generates offline; every missing piece of a folder is named; other architectures and
pickled weights are refused (never unpickled)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mv3dtk.errors import ConfigError
from mv3dtk.testing.tiny_llama import BOS, EOS, EOT, SPECIAL_TOKENS, make_tiny_llama, train_byte_bpe
from mv3dtk.vqa.chat import encode_prompt
from mv3dtk.vqa.llm import check_llm_dir, describe_llm, load_llm, stop_ids

TEXTS = ["Is there a pleural effusion? <short_answer>", "Yes.", "No.", "Pleural effusion is present.",
         "Band-like atelectasis is present in the right lower lobe.", "Describe the scan. <long_answer>"] * 10
FILES = ("chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama", TEXTS, seed=0)


@pytest.fixture
def copy(llm_dir, tmp_path):
    """A fresh copy of the tiny Llama folder to damage."""
    return Path(shutil.copytree(llm_dir, tmp_path / "llama"))


def test_tiny_llama_is_a_complete_llama_folder(llm_dir):
    assert sorted(p.name for p in llm_dir.iterdir()) == sorted(FILES)
    config = json.loads((llm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (64, 2, 4, 2)
    tokenizer = json.loads((llm_dir / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    assert set(special) == set(SPECIAL_TOKENS)
    assert json.loads((llm_dir / "generation_config.json").read_text())["eos_token_id"] == [special[EOS], special[EOT]]


def test_tiny_llama_loads_and_generates_offline(llm_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, tok = load_llm(llm_dir)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) <= 600
    prompt = encode_prompt(tok, [{"from": "human", "value": "Is there a pleural effusion? <short_answer>"}])
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         eos_token_id=stop_ids(tok, model), pad_token_id=stop_ids(tok, model)[0])
    assert out.shape[1] > ids.shape[1] and out[0, :ids.shape[1]].tolist() == prompt
    again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           eos_token_id=stop_ids(tok, model), pad_token_id=stop_ids(tok, model)[0])
    assert torch.equal(out, again)  # greedy: deterministic
    half, _ = load_llm(llm_dir, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_the_tokenizer_round_trips_text_and_keeps_special_tokens_whole(llm_dir):
    _, tok = load_llm(llm_dir)
    for text in ("Yes.", " No.\n", "Pleural  effusion\n\nis présent: 5 mm (b) <long_answer> 😀", "\t"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for name in SPECIAL_TOKENS:
        assert tok.encode(name, add_special_tokens=False) == [tok.convert_tokens_to_ids(name)]
    ids = tok.encode("Yes." + EOT, add_special_tokens=True)
    assert ids[0] == tok.convert_tokens_to_ids(BOS) == tok.bos_token_id  # Llama-3 adds BOS, as the real one does
    assert tok.decode(ids, skip_special_tokens=True) == "Yes."
    assert tok.eos_token == EOT and tok.pad_token_id is None  # as Llama-3.1-Instruct
    assert min(tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))) == len(tok) - len(SPECIAL_TOKENS)  # at the end


def test_the_same_seed_gives_identical_files_and_another_seed_other_weights(llm_dir, tmp_path):
    same = make_tiny_llama(tmp_path / "same", TEXTS, seed=0)
    other = make_tiny_llama(tmp_path / "other", TEXTS, seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (same / name).read_bytes() == (llm_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (llm_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (llm_dir / "tokenizer.json").read_bytes()


def test_the_bpe_vocabulary_is_the_same_in_another_process():
    code = ("import hashlib, json, sys; from mv3dtk.testing.tiny_llama import train_byte_bpe; "
            "print(hashlib.sha256(train_byte_bpe(json.loads(sys.argv[1]), 320).to_str().encode()).hexdigest())")
    texts = [f"{w} {i % 7} lobe" for i, w in enumerate(TEXTS)]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(train_byte_bpe(texts, 320).to_str().encode()).hexdigest()
    with pytest.raises(ConfigError, match="too small"):
        train_byte_bpe(texts, 100)


def test_stop_ids_gather_every_end_token(llm_dir):
    model, tok = load_llm(llm_dir)
    eos, eot = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(EOT)
    assert stop_ids(tok, model) == [eos, eot]
    model.generation_config.eos_token_id = eos  # a generation config that forgets <|eot_id|>
    assert stop_ids(tok, model) == [eos, eot]
    model.generation_config.eos_token_id = None  # none at all: the model config's
    model.config.eos_token_id = [eos]
    assert stop_ids(tok, model) == [eos, eot]
    tok.eos_token = EOS  # a Llama-3 base tokenizer: <|eot_id|> is only in the vocabulary
    assert tok.eos_token_id == eos and stop_ids(tok, model) == [eos, eot]
    model.config.eos_token_id = None
    assert stop_ids(tok, model) == [eos, eot]


def test_a_complete_folder_passes_the_check(llm_dir):
    assert check_llm_dir(str(llm_dir)) == llm_dir


@pytest.mark.parametrize("missing, named", [
    ("config.json", "config.json"),
    ("model.safetensors", "weights (model.safetensors"),
    ("tokenizer.json", "a tokenizer (tokenizer.json or tokenizer.model)"),
    ("chat_template.jinja", "a chat template"),
])
def test_each_missing_piece_is_named(copy, missing, named):
    (copy / missing).unlink()
    with pytest.raises(ConfigError, match="lacks .*" + re.escape(named)) as e:
        check_llm_dir(copy)
    assert str(copy) in str(e.value)
    with pytest.raises(ConfigError, match=missing.split(".")[0]):
        load_llm(copy)


def test_all_missing_pieces_are_named_at_once(copy):
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        (copy / name).unlink()
    with pytest.raises(ConfigError) as e:
        check_llm_dir(copy)
    assert all(w in str(e.value) for w in ("weights", "a tokenizer", "a chat template"))
    assert "config.json" not in str(e.value).split("lacks")[1].split(";")[0]  # config.json itself is there


def test_a_template_in_tokenizer_config_and_a_sharded_model_pass(copy):
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings["chat_template"] = (copy / "chat_template.jinja").read_text()
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    (copy / "chat_template.jinja").unlink()
    (copy / "model.safetensors").rename(copy / "model-00001-of-00001.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    assert check_llm_dir(copy) == copy
    (copy / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(ConfigError, match="shards named in model.safetensors.index.json: model-00001-of-00001"):
        check_llm_dir(copy)


@pytest.mark.parametrize("config, named", [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "BertModel"),
    ({"model_type": "qwen2"}, "qwen2"),
    ({}, "no model_type"),
])
def test_other_architectures_are_refused(copy, config, named):
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"a Llama architecture \\(config.json says {named}"):
        check_llm_dir(copy)


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))  # unpickling this creates the marker file


def test_pickled_weights_are_refused_and_never_opened(copy, tmp_path):
    marker = tmp_path / "unpickled"
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    for call in (check_llm_dir, load_llm):
        with pytest.raises(ConfigError, match="only pickled weights \\(pytorch_model.bin\\).*convert them to "
                                              "safetensors"):
            call(copy)
    assert not marker.exists()
    pickle.loads((copy / "pytorch_model.bin").read_bytes())
    assert marker.exists()  # the file really was a code-running pickle


def test_broken_or_absent_folders_are_config_errors(copy, tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        check_llm_dir(tmp_path / "nowhere")
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not readable JSON"):
        check_llm_dir(copy)


def test_describe_llm_names_the_model_and_fingerprints_its_config(llm_dir, tmp_path):
    info = describe_llm(llm_dir)
    _, tok = load_llm(llm_dir)
    assert info == {"name": "tiny-llama", "architecture": "LlamaForCausalLM", "hidden_size": 64, "layers": 2,
                    "vocab": len(tok),
                    "config_sha256": hashlib.sha256((llm_dir / "config.json").read_bytes()).hexdigest()}
    snap = tmp_path / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "abc123"
    shutil.copytree(llm_dir, snap)
    assert describe_llm(snap)["name"] == "meta-llama/Llama-3.1-8B-Instruct"
