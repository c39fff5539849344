"""Rule-based labeler for chest CT reports: the ``rules`` rewrite backend and the faithfulness check.

Every sentence is searched for the findings in :data:`VOCAB` (plus the vascular-calcification and
"organ is normal" rules below); each hit gets a status from NegEx-style triggers:

* **absent** -- a negation before the finding ("no", "no evidence of", "without", "free of"...), a
  negation after it ("... was not observed", "... are absent", "... has resolved", "... regressed
  completely", "... is no longer seen"), or an organ-normal statement ("Heart size is normal" ->
  no Cardiomegaly);
* **uncertain** -- "possible", "probable", "likely", "suspicious for", "may represent", "?", "...
  cannot be excluded / ruled out" (masked before the negations are searched, so "cannot be
  excluded" is never read as a negation);
* **present** -- otherwise.

A trigger's scope ends at the end of its clause (";", "but", "however", "although", "which",
"except"...), at a positive assertion between the trigger and the finding ("No effusion is seen,
consolidation is present"), and, inside a list, at a finding that is asserted by its own verb ("No
effusion, consolidation is present"). Lists joined by commas / "and" / "or" share the trigger ("No
pleural effusion, pneumothorax or consolidation."). When several triggers reach a finding the nearest
one decides. Laterality is the nearest side word ("right", "left", "bilateral", "both lungs"...) in the
same clause, for the labels that have a side.

A report's label is the strongest of its mentions: present > uncertain > absent (a positive anywhere
wins). Standard library only; importing this module costs ~20 ms (compiling the regexes).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache

from .vocab import (EXTRA_LABELS, LABELS, ORGAN_NORMAL, SUBSUMED_BY, TRIGGERS, VESSELS, VETO, VOCAB,
                    _AND, _BREAK, _CALC_HEAD, _CALC_NOT_VASCULAR, _CHANGE, _CONNECTOR, _LUNG_SIDE,
                    _NGAP, _NO_SIDE, _OR, _POSITIVE, _POST_REACH, _PRE_REACH, _SIDE, _SIDE_REACH)

__all__ = ["EXTRA_LABELS", "LABELS", "VERSION", "Mention", "canonical_statements", "compare", "label_text",
           "mentions", "rules_rewrite", "split_sentences"]

VERSION = "2"  # bump when the vocabulary, the rules or the statements change (recorded as labeler-N)


_RANK = {"absent": 0, "uncertain": 1, "present": 2}
NO_FINDINGS = "No abnormality is described."  # rules_rewrite of a text that mentions no label at all

_I = re.I
_VOCAB_RE = {k: re.compile("|".join(f"(?:{p})" for p in v), _I) for k, v in VOCAB.items() if v}
_VETO_RE = {k: tuple(re.compile(p, _I) if p else None for p in v) for k, v in VETO.items()}
_ORGAN_RE = {k: re.compile(rf"(?:{s}){_NGAP}\b(?:{n})\b|\bnormal (?:{s})", _I) for k, (s, n) in ORGAN_NORMAL.items()}
_CALC_RE, _CALC_BEFORE, _CALC_AFTER = (re.compile(p, _I) for p in (_CALC_HEAD, *_CALC_NOT_VASCULAR))
_ATHERO = re.compile(r"atherom|atheroscler", _I)
_VESSEL_RE = {k: re.compile(v, _I) for k, v in VESSELS.items()}
_TRIGGER_RE = tuple((kind, where, re.compile(p, _I)) for kind, where, p in TRIGGERS)
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_ABBREV = re.compile(r"\b(?:e\.g|i\.e|vs|approx|cf|dr|fig)\.$", _I)


@dataclass(frozen=True)
class Mention:
    label: str
    status: str  # "present" | "absent" | "uncertain"
    sentence: str  # the sentence it came from
    side: str | None  # "right" | "left" | "bilateral" | None


@dataclass(frozen=True)
class _Span:
    label: str
    start: int
    end: int
    status: str | None = None  # fixed status (organ-normal statements); None: decided by the triggers


@dataclass(frozen=True)
class _Trigger:
    kind: str  # "absent" | "uncertain"
    where: str  # "pre" | "post" | "any"
    start: int
    end: int


# ---------------------------------------------------------------------------------------------
# Sentences and spans
# ---------------------------------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after . ! ? followed by white space, and at line breaks."""
    out, start = [], 0
    text = text or ""
    for m in _BOUNDARY.finditer(text):
        if _ABBREV.search(text[max(0, m.start() - 8):m.start()]):
            continue
        out.append(text[start:m.start()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _vetoed(label: str, sent: str, start: int, end: int) -> bool:
    before, after = _VETO_RE.get(label, (None, None))
    lo, hi = _clause_bounds(sent, start, end)
    return bool((before and before.search(sent[max(lo, start - 30):start]))
                or (after and after.search(sent[end:min(hi, end + 40)])))


def _vocab_spans(sent: str) -> list[_Span]:
    out = []
    for label, rx in _VOCAB_RE.items():
        out += [_Span(label, m.start(), m.end()) for m in rx.finditer(sent)
                if not _vetoed(label, sent, m.start(), m.end())]
    return out


def _organ_spans(sent: str) -> list[_Span]:
    return [_Span(label, m.start(), m.end(), "absent") for label, rx in _ORGAN_RE.items() for m in rx.finditer(sent)]


def _vascular_heads(sent: str) -> list[re.Match]:
    return [m for m in _CALC_RE.finditer(sent) if not _CALC_BEFORE.search(sent[max(0, m.start() - 40):m.start()])
            and not _CALC_AFTER.search(sent[m.end():m.end() + 60])]


def _vascular_spans(sent: str) -> list[_Span]:
    """Arterial / coronary calcification: each vessel word goes to the nearest calcification head."""
    heads = _vascular_heads(sent)
    labels: list[set[str]] = [set() for _ in heads]
    for label, rx in _VESSEL_RE.items():
        for v in rx.finditer(sent):
            near = [(max(h.start() - v.end(), v.start() - h.end(), 0), i) for i, h in enumerate(heads)
                    if _clause_bounds(sent, h.start(), h.end()) == _clause_bounds(sent, v.start(), v.end())]
            if near and min(near)[0] <= 80:
                labels[min(near)[1]].add(label)
    out = []
    for h, labs in zip(heads, labels):
        if not labs and _ATHERO.search(h.group()):
            labs = {"Arterial wall calcification"}
        out += [_Span(lab, h.start(), h.end()) for lab in sorted(labs)]
    return out


def _merge(spans: list[_Span]) -> list[_Span]:
    """Overlapping or adjacent (white space / hyphen apart) hits of one label become one span."""
    out: list[_Span] = []
    for sp in sorted(spans, key=lambda s: (LABELS.index(s.label), s.start, -s.end)):
        last = out[-1] if out else None
        if last and last.label == sp.label and last.status == sp.status and sp.start <= last.end + 1:
            out[-1] = _Span(sp.label, last.start, max(last.end, sp.end), sp.status)
        else:
            out.append(sp)
    return sorted(out, key=lambda s: (s.start, LABELS.index(s.label)))


def _spans(sent: str) -> list[_Span]:
    spans = _merge(_vocab_spans(sent) + _vascular_spans(sent) + _organ_spans(sent))
    return [sp for sp in spans if sp.label not in SUBSUMED_BY or not any(
        o.label in SUBSUMED_BY[sp.label] and o.start <= sp.start and sp.end <= o.end for o in spans)]


# ---------------------------------------------------------------------------------------------
# Triggers and scope
# ---------------------------------------------------------------------------------------------
def _triggers(sent: str) -> list[_Trigger]:
    """Every trigger of :data:`TRIGGERS`; a hit masks its characters from the lists searched after it."""
    masked, out = sent, []
    for kind, where, rx in _TRIGGER_RE:
        for m in rx.finditer(masked):
            out.append(_Trigger(kind, where, m.start(), m.end()))
        masked = rx.sub(lambda m: "#" * len(m.group()), masked)
    return sorted(out, key=lambda t: t.start)


@lru_cache(maxsize=256)
def _breaks(sent: str) -> tuple[tuple[int, int], ...]:
    return tuple(b.span() for b in _BREAK.finditer(sent))


def _clause_bounds(sent: str, start: int, end: int) -> tuple[int, int]:
    """The clause holding ``sent[start:end]``: from the previous scope breaker to the next one."""
    lo, hi = 0, len(sent)
    for b_start, b_end in _breaks(sent):
        if b_end <= start:
            lo = b_end
        elif b_start >= end:
            hi = b_start
            break
    return lo, hi


def _asserted_verb(sp: _Span, sent: str, spans: list[_Span], hi: int) -> str | None:
    """The copula of a positive assertion right after ``sp`` (before the next finding), if any."""
    nxt = min([o.start for o in spans if o.start >= sp.end] + [hi])
    m = _POSITIVE.search(sent, sp.end, nxt)
    return None if m is None else (m.group("cop") or m.group("cop2") or "").lower()


def _pre_blocked(t: _Trigger, sp: _Span, sent: str, spans: list[_Span], hi: int) -> bool:
    """Does the scope of a trigger before ``sp`` end before it?"""
    gap = sent[t.end:sp.start]
    if _POSITIVE.search(gap) or _CHANGE.search(gap):
        return True
    between = [o for o in spans if o.start >= t.end and o.end <= sp.start]
    if not between:
        return False
    connector = sent[max(o.end for o in between):sp.start]
    verb = _asserted_verb(sp, sent, spans, hi)  # "No effusion, consolidation is present."
    if verb is None or _OR.search(connector):
        return False
    return not (_AND.search(connector) and verb.split()[0] in ("are", "were", "have"))


def _post_blocked(t: _Trigger, sp: _Span, sent: str, spans: list[_Span]) -> bool:
    """Does a trigger after ``sp`` fail to reach back to it? Findings in between must form a list."""
    gap = sent[sp.end:t.start]
    if _POSITIVE.search(gap):
        return True
    pos = sp.end
    for o in sorted((o for o in spans if o.start >= sp.end and o.end <= t.start), key=lambda o: o.start):
        if not _CONNECTOR.fullmatch(sent[pos:max(pos, o.start)]):
            return True
        pos = max(pos, o.end)
    return False


def _reach(t: _Trigger, sp: _Span, sent: str, spans: list[_Span], hi: int) -> int | None:
    """Distance from trigger ``t`` to ``sp`` when it applies to it, else None."""
    if t.start < sp.end and t.end > sp.start:
        return 0  # inside the phrase: "lymph nodes are not enlarged", "fluid is not seen in the pericardium"
    if t.where in ("pre", "any") and sp.start - _PRE_REACH <= t.end <= sp.start:
        return None if _pre_blocked(t, sp, sent, spans, hi) else sp.start - t.end
    if t.where in ("post", "any") and sp.end <= t.start <= sp.end + _POST_REACH:
        return None if _post_blocked(t, sp, sent, spans) else t.start - sp.end
    return None


def _status(sp: _Span, sent: str, spans: list[_Span], triggers: list[_Trigger]) -> str:
    """The nearest trigger in the clause decides; no trigger: present."""
    if sp.status:
        return sp.status
    lo, hi = _clause_bounds(sent, sp.start, sp.end)
    best: tuple[int, str] | None = None
    for t in triggers:
        d = _reach(t, sp, sent, spans, hi) if lo <= t.start and t.end <= hi else None
        if d is not None and (best is None or d < best[0]):
            best = (d, t.kind)
    return best[1] if best else "present"


def _side_word(word: str) -> str:
    w = word.lower()
    return w if w in ("right", "left") else "bilateral"


def _nearest_side(sp: _Span, sent: str, lo: int, hi: int) -> str | None:
    best: tuple[int, str] | None = None
    for m in _SIDE.finditer(sent, max(lo, sp.start - _SIDE_REACH - 40), min(hi, sp.end + _SIDE_REACH + 40)):
        d = max(sp.start - m.end(), m.start() - sp.end, 0)
        if d <= _SIDE_REACH and (best is None or d < best[0]):
            best = (d, _side_word(m.group()))
    return best[1] if best else None


def _side(sp: _Span, sent: str) -> str | None:
    """The nearest side word in the clause (else in the sentence), within :data:`_SIDE_REACH` characters."""
    if sp.label in _NO_SIDE:
        return None
    lo, hi = _clause_bounds(sent, sp.start, sp.end)
    return _nearest_side(sp, sent, lo, hi) or _nearest_side(sp, sent, 0, len(sent))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def mentions(text: str) -> list[Mention]:
    """Every label mention of ``text``, in text order."""
    out = []
    for sent in split_sentences(text):
        spans, triggers = _spans(sent), _triggers(sent)
        starts = [t.start for t in triggers]
        for sp in spans:  # only the triggers that can reach sp
            near = triggers[bisect_left(starts, sp.start - 2 * _PRE_REACH):bisect_right(starts, sp.end + _POST_REACH)]
            out.append(Mention(sp.label, _status(sp, sent, spans, near), sent, _side(sp, sent)))
    return out


def _resolve(ms: list[Mention]) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in ms:
        if m.label not in out or _RANK[m.status] > _RANK[out[m.label]]:
            out[m.label] = m.status
    return out


def label_text(text: str) -> dict[str, str]:
    """label -> status over the whole text: present > uncertain > absent; unmentioned labels are left out."""
    return _resolve(mentions(text))


def _combine_sides(sides: list[str | None]) -> str | None:
    s = {x for x in sides if x}
    if "bilateral" in s or {"right", "left"} <= s:
        return "bilateral"
    return next(iter(s)) if s else None


def _sides(ms: list[Mention], labels: dict[str, str]) -> dict[str, str | None]:
    """The side of each label, from its mentions that carry the label's final status."""
    return {lab: _combine_sides([m.side for m in ms if m.label == lab and m.status == st])
            for lab, st in labels.items()}


def _where(label: str, side: str | None) -> str:
    if side not in (None, "right", "left", "bilateral"):
        raise ValueError(f"unknown side {side!r} for {label!r} (right, left, bilateral or None)")
    if side is None:
        return ""
    if label in _LUNG_SIDE:
        return " in both lungs" if side == "bilateral" else f" in the {side} lung"
    return " on both sides" if side == "bilateral" else f" on the {side}"


def _statement(label: str, status: str, side: str | None) -> str:
    if status == "present":  # the prompt's exact wording; the side, when known, in a sentence of its own
        where = _where(label, side)
        return f"{label} is present." + (f" {label} is seen{where}." if where else "")
    if status == "uncertain":
        return f"{label} cannot be excluded."
    if status == "absent":
        return f"{label} is not present."  # the CT-CLIP prompt wording, so statements and prompts share a form
    raise ValueError(f"unknown status {status!r} for {label!r} (present, uncertain or absent)")


def canonical_statements(labels: dict[str, str], sides: dict[str, str | None] | None = None) -> list[str]:
    """The canonical statement of each label of ``labels``, in :data:`LABELS` order, worded as the
    CT-CLIP zero-shot prompts are ("Pleural effusion is present." / "... is not present."), so that
    statements of both polarities share the prompts' form. The side of a present label is stated in
    a second sentence ("Pleural effusion is seen in the right lung.")."""
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown labels {sorted(unknown)}; known: {LABELS}")
    sides = sides or {}
    return [_statement(lab, labels[lab], sides.get(lab)) for lab in LABELS if lab in labels]


def rules_rewrite(text: str) -> str:
    """The ``rules`` backend: the canonical statements of ``label_text(text)`` (with sides), joined by
    single spaces; :data:`NO_FINDINGS` when the text mentions no label at all. Deterministic, and
    ``label_text(rules_rewrite(x)) == label_text(x)``."""
    ms = mentions(text)
    labels = _resolve(ms)
    return " ".join(canonical_statements(labels, _sides(ms, labels))) if labels else NO_FINDINGS


def _reason(label: str, src: str | None, out: str | None) -> str | None:
    """Why the output's status of ``label`` is unfaithful to the source's, or None."""
    if out in ("present", "uncertain") and src in (None, "absent"):
        return f"asserts {label}, which the source " + ("does not report" if src is None else "reports as absent")
    if src == "uncertain" and out == "present":
        return f"asserts {label} as certain (uncertain in the source)"
    if src in ("present", "uncertain") and out in ("absent", None):
        return f"{'negates' if out else 'drops'} {label} ({src} in the source)"
    if src == "present" and out == "uncertain":
        return f"hedges {label} (present in the source)"
    return None


def _side_change(label: str, src: dict, out: dict, s_side: dict, o_side: dict) -> str | None:
    """A present finding whose stated side differs (both sides known)."""
    a, b = s_side.get(label), o_side.get(label)
    if src.get(label) == out.get(label) == "present" and a and b and a != b:
        return f"changes the side of {label} ({a} in the source, {b} in the output)"
    return None


def compare(source: str, output: str) -> list[str]:
    """Faithfulness of ``output`` (e.g. an LLM rewrite) to ``source``: the reasons it is unfaithful, in
    :data:`LABELS` order (empty: faithful). Per label, with S / O the source / output status:

    * O present or uncertain, S absent or not mentioned -> "asserts X, which the source does not
      report" / "... reports as absent";
    * S uncertain, O present -> "asserts X as certain (uncertain in the source)";
    * S present or uncertain, O absent -> "negates X (... in the source)"; O not mentioned -> "drops X";
    * S present, O uncertain -> "hedges X (present in the source)";
    * both present, both with a side, sides differ -> "changes the side of X (right in the source, left
      in the output)" (bilateral vs one side counts as a change; an unstated side never does);
    * S absent and O not mentioned, or S not mentioned and O absent -> faithful (negatives may be
      dropped or added).
    The first word of a reason is its kind: asserts, drops, negates, hedges, changes."""
    sm, om = mentions(source), mentions(output)
    src, out = _resolve(sm), _resolve(om)
    s_side, o_side = _sides(sm, src), _sides(om, out)
    reasons = [_reason(lab, src.get(lab), out.get(lab)) or _side_change(lab, src, out, s_side, o_side)
               for lab in LABELS]
    return [r for r in reasons if r]
