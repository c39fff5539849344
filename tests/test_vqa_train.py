"""VQA training learns, and persists exactly (issue #18): the library's two stages on a tiny random Llama
(:mod:`mv3dtk.testing.tiny_llama`, real transformers + peft) and planted image tokens.

The planted task: each volume's cached tokens carry one of two patterns (+u or -u on every token, plus
noise); the question is always "Is there a pleural effusion?", the answer "Yes." for +u and "No." for -u.
Only the image can tell them apart, so a model that answers held-out volumes right has learnt to read the
projected image tokens through the LLM. The control trains the same run with the tokens shuffled across
items so that they say nothing of the answer (exactly half of the "Yes." items and half of the "No." items
carry each pattern; a plain random permutation leaves a chance majority, e.g. 56 %, that a model fed
noise-free held-out patterns turns into 100 %): it must stay at chance.

The models are tiny (114k parameters): one thread each (several threads only fight over the 2 cores).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mv3dtk.dist import DistInfo
from mv3dtk.testing.tiny_llama import make_tiny_llama, pretrain_tiny_llama
from mv3dtk.vqa.chat import encode_conversation, encode_plain
from mv3dtk.vqa.evaluate import answer_items
from mv3dtk.vqa.features import FeatureCache
from mv3dtk.vqa.llm import load_llm
from mv3dtk.vqa.options import VqaTrainOptions
from mv3dtk.vqa.train import Sample, StageTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

QUESTION = "<image>\nIs there a pleural effusion? <short_answer>"
TOKENS, CHANNELS = 8, 16
LOG = logging.getLogger("mv3d.test")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    texts = ["Is there a pleural effusion? <short_answer>", "Yes.", "No.", "Pleural effusion is present.",
             "No pleural effusion.", "Describe the scan."] * 20
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama", texts, seed=0)


REPORTS = {True: "Pleural effusion is present.", False: "No pleural effusion."}


@pytest.fixture(scope="module")
def lm_dir(llm_dir, tmp_path_factory) -> Path:
    """The tiny Llama after a short language-model pretraining on the two captions (150 steps): stage 1
    presupposes an LLM that knows its language (LLaVA starts from Vicuna, CT-CHAT from Llama-3.1), and
    a random LLM gives a projector almost nothing to steer (its loss falls ~6 %)."""
    torch.set_num_threads(1)
    return pretrain_tiny_llama(llm_dir, list(REPORTS.values()), tmp_path_factory.mktemp("lm") / "tiny-lm")


def planted(n: int, seed: int) -> list[dict]:
    """n items, half "Yes." and half "No.", as CT-CHAT conversations."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=g) % 2
    return [{"id": f"v{seed}-{i}", "volume_id": f"v{seed}-{i}", "yes": bool(y), "conversations": [
        {"from": "human", "value": QUESTION, "type": "short_answer"},
        {"from": "gpt", "value": "Yes." if y else "No."}]} for i, y in enumerate(labels.tolist())]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tokens(cache: FeatureCache, items: list[dict], seed: int, *, shuffle: bool = False) -> None:
    """+u or -u on every token (by the item's answer) plus noise. ``shuffle`` redistributes the same
    tokens so that the pattern is independent of the answer: within the "Yes." items and within the "No."
    items, every other one gets a +u volume's tokens and the rest a -u volume's."""
    u = torch.randn(CHANNELS, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    tokens = [(1.0 if it["yes"] else -1.0) * u + 0.5 * torch.randn(TOKENS, CHANNELS, generator=g) for it in items]
    if shuffle:
        pos = [t for t, it in zip(tokens, items) if it["yes"]]
        neg = [t for t, it in zip(tokens, items) if not it["yes"]]
        seen = {True: 0, False: 0}
        shuffled = []
        for it in items:
            k = seen[it["yes"]]
            seen[it["yes"]] += 1
            shuffled.append((pos if k % 2 == 0 else neg).pop())
        tokens = shuffled
    cache.directory.mkdir(parents=True, exist_ok=True)
    for it, t in zip(items, tokens):
        save_file({"tokens": t.to(torch.float16).contiguous()}, str(cache.path(it["volume_id"])))


def options(llm_dir: Path, **kw) -> VqaTrainOptions:
    base = dict(llm=str(llm_dir), lora_r=16, lora_alpha=32, lora_dropout=0.05, lr1=3e-3, lr2=2e-3, projector_lr=2e-3,
                epochs1=1, epochs2=1, batch_size=16, micro_batch=8, max_length=128, checkpoint_every=1000, seed=0)
    return VqaTrainOptions(**{**base, **kw})


def train(stage_dir: Path, stage: str, llm_dir: Path, samples: list[Sample], cache: FeatureCache,
          opts: VqaTrainOptions) -> StageTrainer:
    llm, _ = load_llm(llm_dir)
    trainer = StageTrainer(stage_dir, stage, llm, CHANNELS, samples, cache, opts, {"test": stage}, DistInfo(),
                           torch.device("cpu"), LOG)
    trainer.run()
    return trainer


def accuracy(trainer: StageTrainer, tok, items: list[dict], cache: FeatureCache) -> float:
    rows = answer_items(trainer.model.eval(), tok, items, cache, tasks=("short",), max_new_tokens=4, batch_size=16)
    assert len(rows) == len(items)
    return sum(r["prediction"] == r["answer"] for r in rows) / len(rows)


def test_stage2_learns_the_planted_task_and_shuffled_tokens_do_not(tmp_path, llm_dir):
    _, tok = load_llm(llm_dir)
    train_items, held_out = planted(96, seed=0), planted(40, seed=1)
    results = {}
    for name, shuffle in (("planted", False), ("shuffled", True)):
        cache = FeatureCache(tmp_path / name / "features")
        write_tokens(cache, train_items, seed=0, shuffle=shuffle)
        write_tokens(cache, held_out, seed=1)  # held-out volumes always carry their own pattern
        samples = [Sample(it["volume_id"], encode_conversation(tok, it["conversations"])) for it in train_items]
        trainer = train(tmp_path / name / "stage2", "2", llm_dir, samples, cache, options(llm_dir, epochs2=12))
        results[name] = accuracy(trainer, tok, held_out, cache)
    # measured on seeds 0, 1, 2: planted 1.000, shuffled 0.500 (it answers the same for every volume)
    assert results["planted"] >= 0.9, results
    assert results["shuffled"] <= 0.65, results


def test_stage1_trains_only_the_projector_and_its_loss_falls(tmp_path, lm_dir):
    """The captions say which pattern the volume carries; the projector alone learns to tell the LLM."""
    _, tok = load_llm(lm_dir)
    items = planted(64, seed=0)
    cache = FeatureCache(tmp_path / "features")
    write_tokens(cache, items, seed=0)
    samples = [Sample(it["volume_id"], encode_plain(tok, REPORTS[it["yes"]])) for it in items]
    llm_before = {k: v.clone() for k, v in load_llm(lm_dir)[0].state_dict().items()}
    trainer = train(tmp_path / "stage1", "1", lm_dir, samples, cache, options(lm_dir, epochs1=15))
    rows = [json.loads(x) for x in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last <= 0.7 * first, (first, last)  # the issue's >= 30 % (measured 2.06 -> 1.01)
    # 60 steps: 3 % warm-up (2 steps) to lr1, then cosine towards 0
    lrs = [r["lr"] for r in rows]
    assert len(lrs) == 60 and lrs[:2] == pytest.approx([1.5e-3, 3e-3])
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01 * 3e-3
    assert all(torch.equal(v, llm_before[k]) for k, v in trainer.model.llm.state_dict().items())  # LLM frozen
    assert (tmp_path / "stage1" / "projector.safetensors").is_file()
    assert not (tmp_path / "stage1" / "adapter").exists()


def planted_samples(tmp_path: Path, llm_dir: Path, n: int):
    """-> (tokenizer, n planted items, their token cache, their training samples)."""
    _, tok = load_llm(llm_dir)
    items = planted(n, seed=0)
    cache = FeatureCache(tmp_path / "features")
    write_tokens(cache, items, seed=0)
    return tok, items, cache, [Sample(it["volume_id"], encode_conversation(tok, it["conversations"])) for it in items]


def _logits(trainer_or_model, tok, item, cache):
    model = getattr(trainer_or_model, "model", trainer_or_model).eval()
    enc = encode_conversation(tok, item["conversations"])
    with torch.no_grad():
        x, mask, _ = model.embed([enc.ids], [enc.labels], [cache.read(item["volume_id"])])
        return model.llm(inputs_embeds=x, attention_mask=mask).logits


def test_saved_adapter_and_projector_give_identical_logits(tmp_path, llm_dir):
    from mv3dtk.vqa.evaluate import load_vqa_model
    from mv3dtk.vqa.train import write_model

    tok, items, cache, samples = planted_samples(tmp_path, llm_dir, 16)
    opts = options(llm_dir, epochs2=3, stage="2")
    trainer = train(tmp_path / "run" / "stage2", "2", llm_dir, samples, cache, opts)
    write_model(tmp_path / "run", ("2",), llm_dir, tmp_path / "encoder", "mv3d-image:test", opts, TOKENS, CHANNELS)
    loaded, _, card = load_vqa_model(tmp_path / "run" / "model")
    assert card["llm"] == str(llm_dir) and card["lora"]["r"] == 16
    a, b = _logits(trainer, tok, items[0], cache), _logits(loaded, tok, items[0], cache)
    assert torch.equal(a, b)
    # and the adapter did move the LLM: the base LLM alone gives other logits
    base = type(loaded)(load_llm(llm_dir)[0], loaded.projector)
    assert not torch.allclose(_logits(base, tok, items[0], cache), a)


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, llm_dir):
    _, _, cache, samples = planted_samples(tmp_path, llm_dir, 32)
    opts = options(llm_dir, epochs2=3, batch_size=8, micro_batch=4, checkpoint_every=4)  # 12 steps, ckpt 4, 8, 12
    full = tmp_path / "full"
    train(full, "2", llm_dir, samples, cache, opts)
    # the run "killed" after step 8: its checkpoints up to step 8 and the metrics it had logged
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoints" / "step-00000004", cut / "checkpoints" / "step-00000004")
    shutil.copytree(full / "checkpoints" / "step-00000008", cut / "checkpoints" / "step-00000008")
    (cut / "metrics.jsonl").write_text("".join((full / "metrics.jsonl").read_text().splitlines(True)[:8]))
    with pytest.raises(Exception, match="--resume"):
        train(cut, "2", llm_dir, samples, cache, opts)  # without --resume an existing run is refused
    train(cut, "2", llm_dir, samples, cache, options(llm_dir, epochs2=3, batch_size=8, micro_batch=4,
                                                     checkpoint_every=4, resume=True))
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (full / "metrics.jsonl").read_text().splitlines()[8:] != []
    losses = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(cut) == losses(full)
