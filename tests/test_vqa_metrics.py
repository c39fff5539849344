"""CT-CHAT's VQA scoring (issue #18): :mod:`mv3dtk.vqa.metrics` against pycocoevalcap called directly.

The reference numbers come from pycocoevalcap's own scorers (and the real METEOR 1.5 jar on java) run
on hand-cleaned strings, so the wrapper must give CT-CHAT's numbers, not merely plausible ones. METEOR's
jar takes about 10 s to start: it is started twice in this file (once directly, once by ``score``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from mv3dtk.errors import ConfigError
from mv3dtk.vqa.metrics import (LOG, TASKS, caption_scores, choice_of_answer, normalise, options_of, parse_choice,
                                score, task_of, yes_no)

# (reference, hypothesis) as a model and CT-CHAT's data give them, and the same strings cleaned by hand.
# Reports hold newlines: sent raw, "\n" ends the METEOR jar's input line and breaks its protocol.
REPORT_RAW = [
    ("Findings:\nThere is a 5 mm nodule in the right upper lobe.\r\nNo pleural effusion.",
     "A 5 mm nodule is seen in the right upper lobe.\nThere is no pleural effusion."),
    ("Mild cardiomegaly is present with pericardial effusion.",
     "The heart is mildly  enlarged and there is a small pericardial effusion.\n"),
    ("Emphysematous changes are seen in both lungs.", "Bilateral emphysema is noted. ||| Lungs"),
]
REPORT_CLEAN = [
    ("Findings: There is a 5 mm nodule in the right upper lobe. No pleural effusion.",
     "A 5 mm nodule is seen in the right upper lobe. There is no pleural effusion."),
    ("Mild cardiomegaly is present with pericardial effusion.",
     "The heart is mildly enlarged and there is a small pericardial effusion."),
    ("Emphysematous changes are seen in both lungs.", "Bilateral emphysema is noted. Lungs"),
]
MC_Q = "Which abnormality is present in this scan? (a) Atelectasis (b) Emphysema (c) Pulmonary nodule (d) Consolidation"
MC = [("(b) Emphysema", "(b) Emphysema"), ("(a) Atelectasis", "(c) Pulmonary nodule"),
      ("(d) Consolidation", "Consolidation")]


def pycoco(pairs: list[tuple[str, str]], meteor: Meteor | None = None) -> dict:
    """CT-CHAT's new_llm_metrics.py, run directly on (ref, hyp) pairs."""
    gts = {i: [r] for i, (r, _) in enumerate(pairs)}
    res = {i: [h] for i, (_, h) in enumerate(pairs)}
    return {"bleu1": Bleu(4).compute_score(gts, res, verbose=0)[0][0],
            "meteor": meteor.compute_score(gts, res)[0] if meteor else None,
            "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0],
            "n": len(pairs)}


@pytest.fixture(scope="module")
def direct() -> dict:
    """pycocoevalcap on the hand-cleaned pairs: the whole report set and the MC set (one jar for both)."""
    assert shutil.which("java"), "METEOR needs java: install a Java runtime (.ci/run installs default-jre-headless)"
    m = Meteor()
    try:
        return {"report": pycoco(REPORT_CLEAN, m), "mc": pycoco(MC, m)}
    finally:  # a failed compute_score leaves the lock held; Meteor.__del__ would then hang at exit
        m.meteor_p.kill()
        m.meteor_p.wait()
        if m.lock.locked():
            m.lock.release()


@pytest.fixture
def warnings_logged():
    """The warnings mv3dtk.vqa.metrics logs (a handler on its own logger: the CLI may stop propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    LOG.addHandler(handler)
    yield records
    LOG.removeHandler(handler)


def rows_of(task: str, pairs, question: str = "Q") -> list[dict]:
    return [{"task": task, "question": question, "answer": r, "prediction": h} for r, h in pairs]


def test_normalise_makes_one_line_without_meteor_separator():
    assert normalise(" a\nb\r\nc\rd  e|||f\t g\u2028h ") == "a b c d e f g h"
    assert normalise("Keep Case, and punctuation.") == "Keep Case, and punctuation."
    assert [normalise(r) for r, _ in REPORT_RAW] == [r for r, _ in REPORT_CLEAN]
    assert [normalise(h) for _, h in REPORT_RAW] == [h for _, h in REPORT_CLEAN]


def test_score_with_meteor_equals_pycocoevalcap_per_task_and_ends_java(direct, warnings_logged, monkeypatch):
    """The raw report pairs (newlines, "|||") score exactly as pycocoevalcap on the cleaned ones, METEOR
    included; each task has its own CIDEr; one jar serves both tasks and is ended before score returns."""
    started: list[Meteor] = []

    class Recorded(Meteor):  # keeps a reference, so Meteor.__del__ cannot be what ends the process
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(meteor_module, "Meteor", Recorded)
    out = score(rows_of("report", REPORT_RAW) + rows_of("mc", MC, MC_Q))
    assert list(out["per_task"]) == ["mc", "report"]
    for task in ("report", "mc"):
        got = out["per_task"][task]
        assert got["meteor"] is not None and 0 < got["meteor"] < 1
        for key, want in direct[task].items():
            assert got[key] == pytest.approx(want, abs=1e-12), (task, key)
    assert not warnings_logged
    assert len(started) == 1 and started[0].meteor_p.poll() is not None


def test_caption_scores_equals_pycocoevalcap_without_meteor(direct, capsys):
    got = caption_scores([r for r, _ in REPORT_RAW], [h for _, h in REPORT_RAW], meteor=False)
    assert got == pytest.approx({**direct["report"], "meteor": None})
    assert all(type(got[k]) is float for k in ("bleu1", "rouge_l", "cider"))  # JSON-safe, not numpy
    assert capsys.readouterr().out == ""  # Bleu's verbose print would corrupt --json on stdout


def test_without_java_meteor_is_none_with_a_warning(direct, tmp_path, monkeypatch, warnings_logged):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("java") is None
    got = caption_scores([r for r, _ in MC], [h for _, h in MC])
    assert got == pytest.approx({**direct["mc"], "meteor": None})
    assert len(warnings_logged) == 1 and "java, which is not on PATH" in warnings_logged[0].getMessage()
    out = score(rows_of("report", REPORT_RAW) + rows_of("mc", MC, MC_Q))
    assert out["per_task"]["report"] == pytest.approx({**direct["report"], "meteor": None})
    assert out["overall"]["meteor"] is None
    assert len(warnings_logged) == 2  # once per call, not once per task
    with pytest.raises(ConfigError, match="java"):
        caption_scores(["a"], ["a"], meteor=True)


def test_a_broken_meteor_jar_gives_none_and_the_interpreter_still_exits(tmp_path):
    """A "java" that echoes its input makes pycocoevalcap's float() fail with its lock held; unhandled,
    Meteor.__del__ waits on that lock forever at exit."""
    (tmp_path / "java").write_text("#!/bin/sh\nexec cat\n")
    (tmp_path / "java").chmod(0o755)
    code = ("import json; from mv3dtk.vqa.metrics import caption_scores; "
            "print(json.dumps(caption_scores(['a b c', 'd e'], ['a b', 'd e'])))")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got == pytest.approx({**caption_scores(["a b c", "d e"], ["a b", "d e"], meteor=False), "meteor": None})
    assert "METEOR failed" in run.stderr


def test_empty_input():
    assert caption_scores([], []) == {"bleu1": None, "meteor": None, "rouge_l": None, "cider": None, "n": 0}
    assert score([]) == {"per_task": {}, "overall": {"n": 0, "bleu1": None, "meteor": None, "rouge_l": None,
                                                     "cider": None, "accuracy": None}}
    with pytest.raises(ValueError, match="2 references but 1"):
        caption_scores(["a", "b"], ["a"], meteor=False)


@pytest.mark.parametrize("turn_type, task", [
    ("free_response", "long"), ("description", "long"), ("conversation", "long"), ("multiple_choice", "mc"),
    ("report_generation", "report"), ("short_answer", "short"), ("yes_no", "short"), (None, "short"), ("", "short"),
])
def test_task_of(turn_type, task):
    assert task_of(turn_type) == task
    assert task in TASKS


Q = "Which abnormality is present? (a) Atelectasis (b) Emphysema, (c) Pulmonary nodule or (d) No emphysema. Pick one."


def test_options_of_question():
    assert options_of(Q) == {"a": "Atelectasis", "b": "Emphysema", "c": "Pulmonary nodule", "d": "No emphysema"}
    assert options_of(MC_Q + " <multiple_choice>")["d"] == "Consolidation"
    assert options_of("Is it (a) or (b)? (A) X (B) Y (C) Z (D) W") == {"a": "X", "b": "Y", "c": "Z", "d": "W"}
    assert options_of("Is there a nodule?") == {}


@pytest.mark.parametrize("output, letter", [
    ("(b)", "b"), ("(B)", "b"), ("b)", "b"), ("B", "b"), ("b.", "b"), ("D: No emphysema", "d"),
    ("The answer is (c) Pulmonary nodule.", "c"),
    ("Answer: C", "c"), ("the correct option is d.", "d"),
    ("<|eot_id|>(a)</s>", "a"),
    ("(b) Emphysema. So the answer is (b).", "b"),           # the same letter twice
    ("(b) Atelectasis", "b"),                                # letter and text disagree: the letter counts
    ("(a) or (b)", None),                                    # two letters: ambiguous
    ("(a) Atelectasis (b) Emphysema (c) Pulmonary nodule (d) No emphysema", None),  # echoed options
    ("Atelectasis", "a"), ("pulmonary nodule.", "c"),        # option text only
    ("No emphysema", "d"),                                   # the whole output is option d's text
    ("No emphysema is seen.", "d"),                          # holds b's and d's texts: the longer d
    ("Emphysema is seen in both upper lobes", "b"),
    ("A 5 mm nodule is seen", None),                         # "A" is an article, "nodule" no whole option
    ("There is a pneumothorax", None),                       # article "a"; text matching no option
    ("The answer is a pneumothorax", None),
    ("Atelectasis and emphysema", None),                     # two options' texts
    ("", None),
])
def test_parse_choice(output, letter):
    assert parse_choice(output, Q) == letter


def test_parse_choice_without_options_and_ground_truth_letters():
    assert parse_choice("Atelectasis", "Which abnormality is present?") is None
    assert choice_of_answer("(b) Choice 2") == "b"
    assert choice_of_answer("(D) Consolidation") == "d"
    assert choice_of_answer("Pulmonary nodule", Q) == "c"
    assert choice_of_answer("No idea") is None


@pytest.mark.parametrize("text, want", [
    ("Yes.", "yes"), ("YES", "yes"), ("no", "no"), ("No, there is none.", "no"), ("  yes!", "yes"),
    ("Not seen", None), ("Nodule", None), ("Probably yes", None), ("", None),
])
def test_yes_no(text, want):
    assert yes_no(text) == want


def test_score_accuracy_per_task_cider_and_macro_means():
    mc = rows_of("mc", [("(b) Emphysema", "(b)"), ("(a) Atelectasis", "Pulmonary nodule"),
                        ("(d) No emphysema", "No emphysema"),
                        ("Unlettered answer", "(a)")], Q)  # no letter in the truth: not scored
    short = rows_of("short", [("Yes.", "yes"), ("No.", "Yes, there is."), ("No.", "no"), ("Upper lobe", "upper lobe")])
    long = rows_of("long", [("There is a small nodule in the left lung.", "There is a nodule in the left lung."),
                            ("No effusion.", "There is no effusion.")])
    out = score(mc + short + long, meteor=False)
    per = out["per_task"]
    assert list(per) == ["long", "short", "mc"]
    assert (per["mc"]["accuracy"], per["mc"]["n_accuracy"], per["mc"]["n"]) == (pytest.approx(2 / 3), 3, 4)
    assert (per["short"]["accuracy"], per["short"]["n_accuracy"]) == (pytest.approx(2 / 3), 3)
    assert "accuracy" not in per["long"]
    for task, rows in (("long", long), ("short", short), ("mc", mc)):
        alone = caption_scores([r["answer"] for r in rows], [r["prediction"] for r in rows], meteor=False)
        assert {k: per[task][k] for k in alone} == pytest.approx(alone)
    pooled = caption_scores([r["answer"] for r in long + short], [r["prediction"] for r in long + short], meteor=False)
    assert pooled["cider"] != pytest.approx(per["long"]["cider"])  # IDF is the task's own
    ov = out["overall"]
    assert ov["n"] == 10
    for key in ("bleu1", "rouge_l", "cider"):
        assert ov[key] == pytest.approx(sum(per[t][key] for t in per) / 3)
    assert ov["accuracy"] == pytest.approx(2 / 3) and ov["meteor"] is None
    with pytest.raises(ValueError, match="unknown task"):
        score(rows_of("vqa", [("a", "a")]), meteor=False)
