"""CT-CHAT's VQA scoring: BLEU-1, METEOR, ROUGE-L and CIDEr per task, plus multiple-choice and yes/no accuracy.

    result = score(rows)   # rows: {"task", "question", "answer", "prediction"}
    result["per_task"]["mc"]  # {"bleu1", "meteor", "rouge_l", "cider", "n", "accuracy", "n_accuracy"}

* The text metrics are CT-CHAT's (``evaluations/new_llm_metrics.py``): pycocoevalcap's ``Bleu(4)`` (BLEU-1
  kept), ``Meteor()`` (the METEOR 1.5 jar), ``Rouge()`` (ROUGE-L, F-beta with beta 1.2) and ``Cider()``
  (CIDEr-D), each the corpus-level value ``compute_score`` returns for ``gts={i: [ref]}``,
  ``res={i: [hyp]}``. The strings are raw (no PTBTokenizer, no lowercasing), so the numbers are
  comparable with CT-CHAT's and MedVista3D's; only whitespace is normalised (:func:`normalise`), because a
  newline breaks the METEOR jar's line protocol.
* CIDEr's IDF comes from the references being scored, so every task is scored on its own, as CT-CHAT does.
* METEOR needs ``java``. Without it METEOR is ``None`` (with one logged warning) and the rest is computed
  as usual; the jar's process is always killed when scoring ends, even after an error.
* CT-CHAT has no accuracy code: :func:`parse_choice` (multiple choice) and :func:`yes_no` (short answers)
  are mv3d's, with their rules in their docstrings.
"""

from __future__ import annotations

import logging
import re
import shutil
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from ..errors import ConfigError

TASKS = ("long", "short", "mc", "report")
METRICS = ("bleu1", "meteor", "rouge_l", "cider")
_LONG = {"free_response", "description", "conversation"}
LOG = logging.getLogger("mv3d.vqa.metrics")
NO_JAVA = ("METEOR needs java, which is not on PATH: METEOR is reported as None (BLEU-1, ROUGE-L and CIDEr "
           "are computed). Install a Java runtime (e.g. apt-get install default-jre-headless) to get it.")


def task_of(turn_type: str | None) -> str:
    """CT-CHAT's category of a human turn's ``type`` (``new_llm_metrics.py``): free_response, description
    and conversation -> "long"; multiple_choice -> "mc"; report_generation -> "report"; else "short"."""
    if turn_type in _LONG:
        return "long"
    return {"multiple_choice": "mc", "report_generation": "report"}.get(turn_type or "", "short")


def normalise(text: str) -> str:
    """The raw string CT-CHAT scores, made safe for the METEOR jar: "|||" (its field separator) becomes a
    space, and every run of whitespace (newlines of any kind, tabs, repeated spaces) one space; stripped.
    No lowercasing and no tokenization (BLEU and CIDEr split on whitespace anyway)."""
    return " ".join(text.replace("|||", " ").split())


# ---------------------------------------------------------------------------------------------
# BLEU-1, METEOR, ROUGE-L, CIDEr
# ---------------------------------------------------------------------------------------------
def _want_meteor(meteor: bool | None) -> bool:
    """``None``: METEOR when java is there (else a warning); ``True``: java is required; ``False``: skip."""
    have = shutil.which("java") is not None
    if meteor and not have:
        raise ConfigError("METEOR was asked for but java is not on PATH; install a Java runtime (e.g. apt-get "
                          "install default-jre-headless) or score without METEOR")
    if meteor is None and not have:
        LOG.warning(NO_JAVA)
    return have if meteor is None else meteor


def _stop(scorer) -> None:
    """End the jar's process. A failed ``compute_score`` leaves pycocoevalcap's lock held, and its
    ``__del__`` would then wait for that lock forever at interpreter exit: release it first."""
    proc = scorer.meteor_p
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    proc.kill()
    proc.wait()
    if scorer.lock.locked():
        scorer.lock.release()


@contextmanager
def _meteor_session(enabled: bool) -> Iterator[Callable[[dict, dict], float | None]]:
    """One METEOR jar (about 10 s to start) shared by every call in the block: ``fn(gts, res)`` -> corpus
    METEOR, or None when disabled or after a failure (logged once; the process is ended at once)."""
    state: dict = {"scorer": None, "failed": not enabled}

    def meteor(gts: dict, res: dict) -> float | None:
        if state["failed"]:
            return None
        try:
            if state["scorer"] is None:
                from pycocoevalcap.meteor.meteor import Meteor

                state["scorer"] = Meteor()
            return float(state["scorer"].compute_score(gts, res)[0])
        except (OSError, ValueError) as e:  # no usable java, or the jar did not answer a number
            LOG.warning("METEOR failed (%s: %s); it is reported as None", type(e).__name__, e)
            state["failed"] = True
            if state["scorer"] is not None:
                _stop(state["scorer"])
                state["scorer"] = None
            return None

    try:
        yield meteor
    finally:
        if state["scorer"] is not None:
            _stop(state["scorer"])


def _caption_scores(refs: Sequence[str], hyps: Sequence[str], meteor: Callable[[dict, dict], float | None]) -> dict:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {**dict.fromkeys(METRICS), "n": 0}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [normalise(r)] for i, r in enumerate(refs)}
    res = {i: [normalise(h)] for i, h in enumerate(hyps)}
    return {"bleu1": float(Bleu(4).compute_score(gts, res, verbose=0)[0][0]),  # verbose=1 prints to stdout
            "meteor": meteor(gts, res),
            "rouge_l": float(Rouge().compute_score(gts, res)[0]),
            "cider": float(Cider().compute_score(gts, res)[0]),
            "n": len(refs)}


def caption_scores(refs: Sequence[str], hyps: Sequence[str], *, meteor: bool | None = None) -> dict:
    """Corpus-level BLEU-1, METEOR, ROUGE-L and CIDEr of ``hyps`` against ``refs`` (one reference each),
    on :func:`normalise`-d raw strings -> {"bleu1", "meteor", "rouge_l", "cider", "n"}. No pairs: all None.
    ``meteor``: None = when java is found (else None and a warning), True = java required, False = skip."""
    if not refs and not hyps:
        return {**dict.fromkeys(METRICS), "n": 0}
    with _meteor_session(_want_meteor(meteor)) as met:
        return _caption_scores(refs, hyps, met)


# ---------------------------------------------------------------------------------------------
# Multiple choice and yes/no
# ---------------------------------------------------------------------------------------------
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|<(?:long_answer|short_answer|multiple_choice|report_generation)>")
_PAREN = re.compile(r"\(\s*([a-d])\s*\)", re.I)
_LEADING = re.compile(r"^\s*([a-d])\s*(?:[).:,;]|$)", re.I)
_KEYWORD = re.compile(r"\b(?:answer|option|choice)\s*(?:is\s*)?[:=-]?\s*([a-d])\s*(?=[).:,;]|$)", re.I)
_SENTENCE = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
_TAIL = re.compile(r"(?:[\s,;.?!]|\bor\b|\band\b)+$", re.I)


def _words(text: str) -> str:
    """Lowercase, punctuation -> space, whitespace collapsed: what option texts are compared on."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def options_of(question: str) -> dict[str, str]:
    """The inline options of a CT-CHAT MC question, "... (a) X (b) Y (c) Z (d) W" -> {"a": "X", ...}: the
    last run of markers that starts at "(a)" and goes on in order; each text ends at the next marker (the
    last one also at a sentence that follows it), with trailing separators (", or", "?") cut. Empty when
    the question has none."""
    question = _SPECIAL.sub(" ", question)
    marks = list(_PAREN.finditer(question))
    starts = [i for i, m in enumerate(marks) if m.group(1).lower() == "a"]
    if not starts:
        return {}
    run = [marks[starts[-1]]]
    for m in marks[starts[-1] + 1:]:
        if m.group(1).lower() != "abcd"[len(run)]:
            break
        run.append(m)
        if len(run) == 4:
            break
    ends = [m.start() for m in run[1:]] + [len(question)]
    texts = [question[m.end():end] for m, end in zip(run, ends)]
    texts[-1] = _SENTENCE.split(texts[-1].strip(), maxsplit=1)[0]  # "(d) W. Pick one." -> "W."
    return {m.group(1).lower(): _TAIL.sub("", t).strip() for m, t in zip(run, texts)}


def _one(letters: list[str]) -> str | None:
    distinct = {x.lower() for x in letters}
    return distinct.pop() if len(distinct) == 1 else None


def parse_choice(output: str, question: str = "") -> str | None:
    """The option letter ("a".."d") a model's ``output`` picks, or None when it picks none or is ambiguous.

    Rules, in order; the first that finds anything decides:

    1. Letters in parentheses, "(b)" or "(B)" anywhere ("The answer is (c) Nodule"): one distinct letter
       -> it; several different ones ("(a) or (b)", an echoed option list) -> None. A letter in parentheses
       wins over the text after it: "(b) Atelectasis" is b even when Atelectasis is option (a).
    2. A bare letter opening the output, alone or followed by ``) . : , ;`` ("B", "b.", "b) Emphysema").
       An article ("A 5 mm nodule") has no such mark and is not a letter.
    3. A bare letter after "answer", "option" or "choice" (optionally "is" and ":"), followed by
       ``) . : , ;`` or the end ("Answer: C", "the correct option is b."); several different -> None.
    4. The options' texts, parsed from ``question`` (:func:`options_of`), compared case- and punctuation-
       insensitively: the output equal to one option's text -> it; else the options whose text appears in
       the output as whole words, dropping any that is part of a longer matching one ("No emphysema" picks
       "No emphysema" over "Emphysema"): exactly one left -> it, else None.

    Special tokens (``<|eot_id|>``, ``</s>``, task tokens) are removed first.
    """
    text = _SPECIAL.sub(" ", output).strip()
    for rule in (_PAREN.findall, _LEADING.findall, _KEYWORD.findall):
        found = rule(text)
        if found:
            return _one(found)
    options = {k: _words(v) for k, v in options_of(question).items() if _words(v)}
    said = _words(text)
    if not said:
        return None
    exact = [k for k, v in options.items() if v == said]
    if exact:
        return _one(exact)
    hits = [k for k, v in options.items() if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", said)]
    hits = [k for k in hits if not any(options[k] != options[o] and options[k] in options[o] for o in hits)]
    return _one(hits)


def choice_of_answer(answer: str, question: str = "") -> str | None:
    """The ground truth's letter: CT-CHAT's MC answers read "(b) Choice 2" -> "b" (rule 1 of
    :func:`parse_choice`; the other rules apply to answers written otherwise)."""
    return parse_choice(answer, question)


def yes_no(text: str) -> str | None:
    """"yes" or "no" when the text, lowercased with punctuation removed, starts with that word ("Yes.",
    "no, there is none", "YES"); else None ("Not seen", "Probably")."""
    words = _words(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def _accuracy(rows: list[dict], truth: Callable[[dict], str | None], guess: Callable[[dict], str | None]) -> dict:
    """Accuracy over the rows whose ground truth has a label; an unparsed prediction counts as wrong."""
    scored = [(t, guess(r)) for r in rows if (t := truth(r)) is not None]
    acc = sum(t == g for t, g in scored) / len(scored) if scored else None
    return {"accuracy": acc, "n_accuracy": len(scored)}


def score(rows: Sequence[dict], *, meteor: bool | None = None) -> dict:
    """Score answered turns, per task and overall.

    ``rows``: {"task", "question", "answer" (ground truth), "prediction"}. Per task present (in
    :data:`TASKS` order): :func:`caption_scores` of the predictions against the answers (CIDEr's IDF from
    that task's answers alone), and
    * mc: ``accuracy`` = share of turns whose ground-truth letter (:func:`choice_of_answer`) the prediction
      picks (:func:`parse_choice`), over the ``n_accuracy`` turns whose answer has a letter;
    * short: ``accuracy`` = share of turns whose prediction's :func:`yes_no` equals the answer's, over the
      ``n_accuracy`` turns whose answer is a yes or a no.
    ``overall``: each metric's mean over the tasks where it is defined (macro; None if none), and ``n``.
    One METEOR process serves every task.
    """
    by_task = {t: [r for r in rows if r["task"] == t] for t in TASKS}
    unknown = {r["task"] for r in rows} - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; tasks are {TASKS}")
    per_task: dict[str, dict] = {}
    with _meteor_session(bool(rows) and _want_meteor(meteor)) as met:
        for task, group in by_task.items():
            if not group:
                continue
            m = _caption_scores([r["answer"] for r in group], [r["prediction"] for r in group], met)
            if task == "mc":
                m |= _accuracy(group, lambda r: choice_of_answer(r["answer"], r["question"]),
                               lambda r: parse_choice(r["prediction"], r["question"]))
            elif task == "short":
                m |= _accuracy(group, lambda r: yes_no(r["answer"]), lambda r: yes_no(r["prediction"]))
            per_task[task] = m
    overall: dict = {"n": len(rows)}
    for key in (*METRICS, "accuracy"):
        vals = [m[key] for m in per_task.values() if m.get(key) is not None]
        overall[key] = sum(vals) / len(vals) if vals else None
    return {"per_task": per_task, "overall": overall}
