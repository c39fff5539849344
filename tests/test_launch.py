"""The shared training-stage machinery: options written once (Click options and the launcher's argv
from one dataclass), run names, throughput, trackers and the loss plot."""

from __future__ import annotations

import dataclasses
import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from mv3dtk.errors import ConfigError
from mv3dtk.launch import needs_launch, run_name, run_name_env
from mv3dtk.options import options_of, to_argv
from mv3dtk.stages._config import click_options
from mv3dtk.tracking import make_tracker
from mv3dtk.train.loop import Throughput, TrainConfig
from mv3dtk.train.options import PAPER_BATCH, PAPER_CONFIG, PretrainOptions, parse_losses
from mv3dtk.train.plots import plot_metrics, smooth


def _parse(cls, argv):
    """What the generated Click command makes of ``argv``."""
    got = {}

    @click.command()
    @click_options(cls)
    def cmd(**kw):
        got.update(kw)

    result = CliRunner().invoke(cmd, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return cls(**got)


def test_argv_from_the_options_reproduces_them_in_the_child():
    opts = PretrainOptions(backbone="unimiss", model_config="unimiss-tiny", freeze_text=True, batch_size=6, lr=3e-4,
                           losses="global,local", global_text="statements", mask_pool_layer=-2, max_steps=7,
                           compile=True, workers=0, seed=3, resume=True, report_to="tensorboard", nproc=2,
                           run_name="r")
    child = _parse(PretrainOptions, to_argv(opts))
    # every forwarded option arrives; --nproc and --run are not forwarded (the launcher sets them)
    assert child == dataclasses.replace(opts, nproc=1, run_name=None)
    assert "--nproc" not in to_argv(opts) and "--run" not in to_argv(opts)
    assert _parse(PretrainOptions, []) == PretrainOptions()  # the Click defaults are the field defaults


def test_every_pretrain_field_is_an_option_and_own_options_come_first():
    names = [f.name for f, _, _ in options_of(PretrainOptions)]
    assert set(names) == {f.name for f in dataclasses.fields(PretrainOptions)}
    assert names[0] == "backbone" and names[-4:] == ["nproc", "resume", "run_name", "report_to"]


def test_paper_defaults_live_with_the_options():
    opts = PretrainOptions(backbone="unimiss").with_paper_defaults()
    assert (opts.model_config, opts.batch_size) == (PAPER_CONFIG["unimiss"], PAPER_BATCH["unimiss"]) == \
        ("unimiss-small", 20)
    assert PretrainOptions(batch_size=4).with_paper_defaults().batch_size == 4
    # TrainConfig has no defaults of its own for what the user sets: it cannot drift from the options
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.default is dataclasses.MISSING]
    assert "lr" in missing and "batch_size" in missing and "epochs" in missing


def test_one_loss_spelling_with_the_old_one_accepted():
    assert parse_losses("global,local,global-semantic,local_semantic") == (
        "global", "local", "global_semantic", "local_semantic")
    with pytest.raises(ConfigError, match="choose from global, local, global_semantic, local_semantic"):
        parse_losses("global,semantic")


def test_resume_key_keeps_the_fingerprint_of_runs_begun_with_hyphenated_loss_names():
    cfg = TrainConfig(model={}, losses=("global", "global_semantic"), batch_size=2, epochs=1, max_steps=None, lr=1.0,
                      weight_decay=0.0, warmup_steps=0, rsmb_size=4, rsmb_init="none", init_from=None,
                      precision="fp32", workers=0, seed=0, checkpoint_every=1, compile=False, freeze_text=False,
                      global_text="report")
    assert cfg.resume_key()["losses"] == ("global", "global-semantic")


def test_run_names(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_name("a1", "vit") == "a1" and run_name(None, "vit").startswith("vit-")
    for bad in ("a/b", ".hidden"):
        with pytest.raises(ConfigError, match="plain folder name"):
            run_name(bad, "vit")
    assert run_name_env("segment-finetune") == "MV3D_SEGMENT_FINETUNE_RUN_NAME"
    assert needs_launch(2) and not needs_launch(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not needs_launch(2)  # already one of torchrun's processes
    with pytest.raises(ConfigError, match="pass --run NAME"):
        run_name(None, "vit")


def test_throughput_over_the_interval_and_the_run():
    meter = Throughput(batch_size=8, step=10, now=100.0)  # a resumed run starts at step 10
    assert meter.run_rate(12, 102.0) == pytest.approx(8.0)
    assert meter.interval_rate(12, 102.0) == pytest.approx(8.0)
    assert meter.interval_rate(16, 103.0) == pytest.approx(32.0)  # 4 steps x 8 volumes in 1 s
    assert meter.run_rate(16, 103.0) == pytest.approx(16.0)  # 48 volumes in 3 s


def test_smoothing_is_a_trailing_mean_and_the_plot_has_both_lines(tmp_path):
    values = np.array([4.0, 2.0, 6.0, 0.0, 8.0])
    expect = [np.mean(values[max(0, i - 1):i + 1]) for i in range(5)]
    assert np.allclose(smooth(values, 2), expect)
    assert np.allclose(smooth(values, 1), values)
    rows = [{"step": i + 1, "loss": 3.0 - i * 0.01 + 0.2 * (-1) ** i, "global": 1.0} for i in range(60)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(tmp_path / "m.jsonl", tmp_path / "loss.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "loss.png")  # (H, W, 4) decoded
    assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05


def test_trackers(tmp_path, monkeypatch):
    make_tracker("none", tmp_path, "pretrain", {}).log(1, {"loss": 1.0})
    with pytest.raises(ConfigError, match="choose from none, tensorboard, wandb"):
        make_tracker("mlflow", tmp_path, "pretrain", {})
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        make_tracker("wandb", tmp_path, "pretrain", {})


def test_tensorboard_tracker_writes_readable_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = make_tracker("tensorboard", tmp_path, "pretrain", {})
    for step in (1, 2, 3):
        tracker.log(step, {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-3, "nan": float("nan")})
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"pretrain/loss", "pretrain/lr"}
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("pretrain/loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]

