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

from mv3dtk.data.ctrate import ABNORMALITIES

__all__ = ["EXTRA_LABELS", "LABELS", "VERSION", "Mention", "canonical_statements", "compare", "label_text",
           "mentions", "rules_rewrite", "split_sentences"]

VERSION = "2"  # bump when the vocabulary, the rules or the statements change (recorded as labeler-N)


def _gap(n: int) -> str:
    """Up to ``n`` characters inside one phrase: no clause end, comma, conjunction or "normal" (a
    negation may sit inside: "the heart is not enlarged" is then an absent Cardiomegaly)."""
    return rf"(?:(?!\b(?:and|but|or|normal|with|without)\b)[^.;:,]){{0,{n}}}?"


_LGAP = r"(?:(?!\b(?:no|not|without|but)\b)[^.;:]){0,50}?"  # a longer gap that may cross a list

# ---------------------------------------------------------------------------------------------
# Vocabulary: label -> regexes (case-insensitive) of the phrases that mention it.
# ---------------------------------------------------------------------------------------------
VOCAB: dict[str, tuple[str, ...]] = {
    "Medical material": (
        r"\bmedical (?:materials?|devices?)\b", r"\bforeign (?:materials?|bod(?:y|ies))\b",
        r"\bport(?:[\s-]a[\s-]cath)?\b", r"\bcatheters?\b", r"\bpace-?makers?\b", r"\bdefibrillators?\b",
        r"\bpacing (?:leads?|wires?)\b", r"\bsternotomy\b", r"\b(?:sternal|cerclage|surgical) (?:wires?|sutures?)\b",
        r"\bstents?\b", r"\b(?:surgical|metallic|vascular) clips?\b", r"\bprosthe\w*", r"\bimplants?\b",
        r"\bvalv(?:e|ular) replacement\b",
        r"\b(?:endotracheal|tracheostomy|nasogastric|chest|drainage) tubes?\b", r"\bembolization coils?\b"),
    "Arterial wall calcification": (),  # see _vascular_spans: a calcification + a non-coronary vessel
    "Cardiomegaly": (
        r"\bcardiomegal\w*",
        rf"\b(?:heart|cardiac (?:contours?|silhouette|size|shadow|dimensions?))\b{_gap(25)}\b(?:enlarg\w*|increased)",
        r"\b(?:enlarg\w*|increased) (?:heart|cardiac)\b",
        rf"\bcardiothoracic (?:ratio|index)\b{_gap(25)}\b(?:increased|above|high|exceed\w*)"),
    "Pericardial effusion": (
        r"\bpericardial(?:\s*(?:,|or|and|/)\s*pleural)?[\s-]+(?:effusions?|fluid)\b",
        rf"\b(?:effusions?|fluid)\b{_gap(30)}\bpericardi\w*"),
    "Coronary artery wall calcification": (),  # see _vascular_spans: a calcification + a coronary artery
    "Hiatal hernia": (
        r"\bhiat(?:al|us) hernia\w*", rf"\bhernia\w*{_gap(40)}\bhiatus\b", r"\bpara-?esophageal hernia\w*"),
    "Lymphadenopathy": (
        r"\b(?:lymph)?adenopath\w*", r"\blymphadenomegal\w*",
        rf"\b(?:enlarged|enlargement of|patholog\w*|increased[\s-]+sized?|bulky)\b{_LGAP}\blymph[\s-]?nodes?\b",
        r"\blymph[\s-]?nodes?\b[^.;:]{0,60}?\b(?:enlarg\w*|patholog\w*|increased (?:size|dimensions?))",
        r"\benlarged (?:\w+ )?nodes\b"),
    "Emphysema": (r"\bemphysem\w*", r"\bbullae?\b", r"\bbullous\b"),
    "Atelectasis": (
        r"atelecta\w*", r"\b(?:lobar|segmental|subsegmental|lung|lobe) collapse\b",
        r"\bcollapsed? (?:lobe|lung|segment)\b"),
    "Lung nodule": (r"\b(?:micro)?nodul\w*",),
    "Lung opacity": (
        r"\bopacit\w*", r"\bground[\s-]glass\b", r"\bGGOs?\b", r"\binfiltra\w*", r"\bcrazy[\s-]paving\b",
        r"\b(?:increased|patchy|hazy|alveolar|parenchymal) densit(?:y|ies)\b", r"\bdensity increases?\b"),
    "Pulmonary fibrotic sequela": (
        r"\bfibro(?:sis|tic|-?atelecta)\w*", r"\bsequel\w*", r"\b(?:parenchymal|fibrous) bands?\b",
        r"\bhoneycomb\w*"),
    "Pleural effusion": (
        r"\bpleural(?:\s*(?:,|or|and|/)\s*pericardial)?[\s-]+(?:effusions?|fluid)\b",
        rf"\b(?:effusions?|fluid)\b{_gap(30)}\bpleural (?:spaces?|cavit(?:y|ies)|recess\w*)",
        r"\b(?:hydro|hemo)thorax\b",
        # a bare "effusion" is pleural unless pericardial is named with it
        r"(?<!pericardial )(?<!pleural )(?<!pericardial-)(?<!pleural-)\beffusions?\b(?![^.;:]{0,30}\bpericardi)"),
    "Mosaic attenuation pattern": (r"\bmosaic\w*",),
    "Peribronchial thickening": (
        r"\bperibronchial[\s-]+(?:wall[\s-]+)?(?:thicken\w*|cuffing)", r"\bbronch\w*[\s-]+wall[\s-]+thicken\w*",
        r"\bthicken\w*(?: of)?(?: the)? (?:peri)?bronch\w*(?: walls?)?",
        r"\bbronch\w* wall thickness (?:is )?increas\w*|\bincreased (?:peri)?bronch\w* wall thickness\b"),
    "Consolidation": (r"\bconsolidat\w*",),
    "Bronchiectasis": (
        r"\bbronchi(?:ol)?ecta\w*", r"\b(?:dilated|dilatation of the|dilation of the|ectatic) bronch\w*"),
    "Interlobular septal thickening": (
        r"\b(?:(?:interlobular|intralobular|interlobar)\s+)?sept(?:al|a)[\s-]+thicken\w*",
        r"\bthicken\w*(?: of)?(?: the)? (?:(?:interlobular|intralobular)\s+)?sept(?:a|al|um)\b",
        rf"\binterlobular sept\w*{_gap(25)}\bthicken\w*"),
    # ---- extra labels (not among the 18 CT-RATE abnormalities) ----
    "Pneumothorax": (r"\b(?:hydro)?pneumothora\w*",),
    "Pleural thickening": (
        r"\bpleural(?:[\s-]+effusion)?[\s-]+(?:wall[\s-]+)?thicken\w*", r"\bthicken\w*(?: of)?(?: the)? pleura\b",
        r"\bpleural plaques?\b"),
    "Pneumonia": (r"pneumoni\w*",),
    "Thyroid nodule": (
        rf"\bthyroid\b{_gap(40)}\b(?:micro)?nodul\w*", rf"\b(?:micro)?nodul\w*{_gap(40)}\bthyroid\b",
        r"\b(?:multi)?nodular goit\w*"),
    "Mass": (r"\bmass(?:es)?\b(?![\s-]+effect)",),
    "Hepatic steatosis": (
        r"\b(?:hepato)?steatos\w*", r"\bfatty (?:liver|infiltration of the liver|changes? (?:of|in) the liver)\b",
        r"\b(?:decreased|reduced|low) (?:liver|hepatic) (?:density|attenuation)\b",
        rf"\b(?:liver|hepatic)(?: parenchym\w*)? (?:density|attenuation)\b{_gap(15)}\b(?:decreased|reduced|low)"),
    "Hepatomegaly": (r"\bhepato(?:spleno)?megal\w*", rf"\bliver\b{_gap(20)}\benlarg\w*", r"\benlarged liver\b"),
    "Splenomegaly": (r"\b(?:hepato)?splenomegal\w*", rf"\bspleen\b{_gap(20)}\benlarg\w*", r"\benlarged spleen\b"),
    "Renal cyst": (rf"\b(?:renal|kidneys?)\b{_gap(40)}\bcyst\w*", rf"\bcyst\w*{_gap(40)}\b(?:renal|kidneys?)\b"),
    "Vertebral degenerative change": (
        r"\bosteophyt\w*", r"\bspondylo(?:sis|tic|arthro\w*)",
        rf"\bdegenerat\w*{_gap(40)}\b(?:vertebra\w*|spin\w*|spondyl\w*|intervertebral|dis[ck]s?)\b",
        rf"\b(?:vertebra\w*|spin\w*)\b{_gap(30)}\bdegenerat\w*"),
    "Fracture": (r"\bfractur\w*",),
    "Aortic aneurysm": (
        r"\baneurysm\w*", r"\baortic (?:ectasia|dilat\w*|enlargement)\b",
        r"\b(?:ectatic|dilated|enlarged|aneurysmal) (?:(?:ascending|descending|thoracic|abdominal)\s+)?aorta\b",
        r"\b(?:dilatation|dilation|ectasia|enlargement) of the (?:(?:ascending|descending|thoracic)\s+)?aort(?:a|ic)\b",
        rf"\baort(?:a|ic)\b{_gap(25)}\b(?:dilat\w*|ectati\w*|enlarged)"),
    "Esophageal wall thickening": (
        r"\besophag\w*(?:(?!bronch|trache)[^.;:]){0,80}?\bwall[\s-]+thicken\w*",
        rf"(?<!bronchial )\bwall[\s-]+thicken\w*{_gap(30)}\besophag\w*",
        r"\bthicken\w*(?: of)?(?: the)? esophag\w*(?: walls?)?\b"),
}

EXTRA_LABELS: tuple[str, ...] = tuple(k for k in VOCAB if k not in ABNORMALITIES)
LABELS: tuple[str, ...] = ABNORMALITIES + EXTRA_LABELS

# Context that cancels a hit: label -> (regex on the ~30 characters before it, regex on the ~40 after it).
_ORGANS = r"thyroid|liver|hepatic|adrenal|kidneys?|renal|breasts?|spleen|splenic|pancrea\w*|skin|subcutaneous"
VETO: dict[str, tuple[str | None, str | None]] = {
    "Lung nodule": (rf"\b(?:{_ORGANS}|pleural)\W+(?:\w+\W+)?$",
                    rf"^[^,]*?\b(?:in|of|within|on)\W+(?:the\W+)?(?:\w+\W+){{0,3}}?(?:{_ORGANS})\b"),
    "Emphysema": (r"\b(?:subcutaneous|soft[\s-]tissues?|mediastinal|surgical)\W+(?:\w+\W+)?$",
                  r"^\W*(?:in|of|within)\W+(?:the\W+)?(?:\w+\W+)?(?:subcutaneous|soft[\s-]tissues?|chest wall|neck)\b"),
    "Lung opacity": (r"\b(?:liver|hepatic|splenic|bone|fatty|renal|kidney|breast)\W+(?:\w+\W+)?$", None),
    "Pulmonary fibrotic sequela": (r"\b(?:liver|hepatic|myocardial|retroperitoneal|cystic|breast)\W+(?:\w+\W+)?$",
                                   None),
    "Interlobular septal thickening": (r"\b(?:interatrial|interventricular|atrial|ventricular|nasal)\W+$", None),
    "Mass": (r"\b(?:body|bone|muscle)\W+$", None),
}

# A hit inside a hit of a more specific label is dropped: "thyroid gland shows no nodule" is no lung nodule.
SUBSUMED_BY: dict[str, tuple[str, ...]] = {"Lung nodule": ("Thyroid nodule",)}

# Organ-normal statements ("Heart size is normal", "The liver is of normal size"): label -> (organ, normal
# phrase); either order ("normal heart size"). The hit is an absent mention of the label.
_NORMAL_SIZE = r"normal (?:size|dimensions?)|size (?:is |was )?(?:normal|natural)"
ORGAN_NORMAL: dict[str, tuple[str, str]] = {
    "Cardiomegaly": (r"\b(?:heart|cardiac (?:size|contours?|dimensions?|silhouette|shadow))\b",
                     r"normal|natural|unremarkable"),
    "Lymphadenopathy": (r"\blymph[\s-]?nodes?\b",
                        r"normal (?:size|dimensions?|appearance)|within normal (?:size )?limits"),
    "Hepatomegaly": (r"\bliver\b", _NORMAL_SIZE),
    "Splenomegaly": (r"\bspleen\b", _NORMAL_SIZE),
    "Hepatic steatosis": (r"\bliver(?: parenchym\w*)? (?:density|attenuation)\b", r"normal|natural"),
    "Aortic aneurysm": (r"\b(?:(?:thoracic|ascending|descending|abdominal)\s+)?aorta\b"
                        r"|\baortic (?:diameter|calib\w*|width)\b",
                        r"normal (?:calib\w*|diameter|width|size)"
                        r"|(?:calib\w*|diameter|width) (?:is |was )?(?:normal|natural)|(?:is|was) (?:normal|natural)"),
}
_NGAP = r"(?:(?!\b(?:but|not|no|increas\w*|enlarg\w*|dilat\w*|above|exceed\w*|patholog\w*)\b)[^.;:]){0,30}?"

# Vascular calcification: a "head" (calcification / plaque / atheroma, adjacent words merged) is given to
# the labels of the vessel words nearest to it; a head with no vessel is arterial only when it says
# atheroma / atherosclerosis ("Calcific atheromatous plaques"), otherwise ignored ("calcified nodule").
_CALC = r"(?:calcif\w*|atherom\w*|atheroscler\w*|plaques?)"
_CALC_HEAD = rf"\b{_CALC}\b(?:[\s-]+(?:\w+[\s-]+)?{_CALC}\b)*"
_CALC_NOT_VASCULAR = (  # before / after the head: a calcified node, granuloma, valve, pleural plaque...
    r"\b(?:pleural|valv\w*|annul\w*|mitral|costal|cartilage|parenchymal|nodular|granulomatous|splenic|hepatic|"
    r"pancreatic|renal|thyroid|prostat\w*)[\s-]+(?:\w+[\s-]+)?$",
    r"^[\s-]+(?:\w+[\s-]+){0,3}?(?:lymph|nodes?|nodules?|nodular|granulom\w*|cartilages?|valv\w*|foc(?:us|i)|"
    r"lesions?|densit\w*|pleura\w*|mass\w*|cysts?|tumou?rs?)\b")
VESSELS: dict[str, str] = {
    "Arterial wall calcification": r"\baort(?:a|ic)\b|\b(?:carotid|subclavian|iliac|brachiocephalic|innominate)\b"
                                   r"|\bfemoral\b|\bvascular\b|\bgreat vessels\b|(?<!coronary )\barter(?:ial|ies)\b",
    "Coronary artery wall calcification": r"\bcoronar\w*|\bLAD\b|\bleft anterior descending\b|\bcircumflex\b|\bRCA\b",
}

# ---------------------------------------------------------------------------------------------
# Triggers, in the order they are searched; each hit is masked so later lists cannot reuse its words.
# where: "pre" reaches forward to a finding, "post" reaches back, "any" both ways.
# ---------------------------------------------------------------------------------------------
TRIGGERS: tuple[tuple[str, str, str], ...] = (
    # uncertainty that contains a negation word: "cannot be excluded", "is not ruled out", "cannot exclude"
    ("uncertain", "post", r"\b(?:cannot|can ?not|could not|may not)\s+be\s+(?:excluded|ruled\s+out|eliminated)\b"
                          r"|\b(?:is|are|was|were)\s+not\s+(?:excluded|ruled\s+out)\b"),
    ("uncertain", "pre", r"\b(?:cannot|can ?not|could not)\s+(?:exclude|rule\s+out)\b"),
    # post-negation: "was not observed", "are absent", "ruled out", "has resolved", "no longer seen"
    ("absent", "post", r"\b(?:(?:is|are|was|were|has been|have been|could be|can be)\s+)?(?:not|never)\s+(?:been\s+)?"
                       r"(?:seen|observed|detected|identified|present|visuali[sz]ed|noted|evident|demonstrated|found|"
                       r"appreciated|depicted|encountered|shown|recognized)\b"),
    ("absent", "post", r"\b(?:is|are|was|were)\s+(?:absent|excluded)\b|\bruled\s+out\b"
                       r"|:\s*(?:absent|none|negative|no)\s*(?=[.;,]|$)"),  # "Cardiomegaly: absent."
    ("absent", "post", r"\b(?:regressed|resolved|disappeared)\s+completely\b"
                       r"|\bcompletely\s+(?:regressed|resolved|disappeared)\b"
                       r"|(?<!partially )(?<!partly )\b(?:resolved|disappeared)\b"),
    ("absent", "post", r"\bno\s+longer\s+(?:seen|visible|present|observed|evident|detected|identified"
                       r"|visuali[sz]ed)\b"),
    # post-uncertainty: "is suspected", "is likely", "should be considered"
    ("uncertain", "post", r"\b(?:is|are|was|were)\s+(?:(?:un)?likely|suspected|possible|probable|questionable"
                          r"|considered)\b"
                          r"|:\s*(?:possible|uncertain|equivocal|indeterminate)\b"
                          r"|\b(?:should|must)\s+be\s+(?:considered|excluded|ruled\s+out)\b"),
    # pre-negation: "no", "no evidence of", "without", "absence of", "negative for", "free of", "resolution of"
    ("absent", "pre", r"\b(?:no\s+(?:evidence|signs?|findings?)\s+(?:of|for|suggest\w*\s+of)|no|not|without"
                      r"|absence\s+of"
                      r"|negative\s+for|free\s+of|neither|nor|resolution\s+of|complete\s+regression\s+of|rather\s+than"
                      r"|instead\s+of)\b"),
    # pre-uncertainty: "possible", "probable", "likely", "suspicious for", "may represent", "rule out"
    ("uncertain", "pre", r"\b(?:suspicious\s+(?:for|of)|suspicion\s+(?:of|for)|suspected|possible|possibly|probable"
                         r"|probably|(?:un)?likely|questionable|equivocal|(?:may|might|could)\s+(?:represent|be|indicate)"
                         r"|(?:to\s+)?rule\s+out|suggestive\s+of|concerning\s+for"
                         r"|differential\s+diagnos\w*\s+(?:includes?|of))\b"),
    ("uncertain", "any", r"\?"),  # "Atelectasis?"
)

# Scope breakers: a trigger never reaches across these.
_BREAK = re.compile(r";|\b(?:but|however|although|though|whereas|while|which|except|apart\s+from|aside\s+from"
                    r"|other\s+than|yet|nevertheless)\b", re.I)
# An explicit positive assertion ("is seen", "are noted", "there is"): ends a negation's scope.
_POSITIVE = re.compile(r"\b(?P<cop>is|are|was|were|has\s+been|have\s+been)\s+(?:(?!not\b|no\b|never\b)\w+\s+){0,2}?"
                       r"(?:seen|noted|present|observed|detected|identified|visuali[sz]ed|evident|demonstrated|found"
                       r"|appreciated|shown|enlarged|increased|located|described)\b"
                       r"|\bthere\s+(?P<cop2>is|are|was|were)\b(?!\s+no\b)"
                       r"|\b(?:shows?|showed|contains?|reveals?)\b(?!\s+no\b)",
                       re.I)
_PRE_REACH, _POST_REACH = 150, 100  # characters a trigger reaches forward / back at most
# "No significant change in the nodule": the nodule is there.
_CHANGE = re.compile(r"\b(?:change|changes|difference|progression|increase|growth|interval)\b", re.I)
_CONNECTOR = re.compile(r"[\s,/&-]*(?:(?:and|or|nor|and/or|as\s+well\s+as)[\s,/-]*)?", re.I)
_OR = re.compile(r"\b(?:or|nor)\b", re.I)
_AND = re.compile(r"\band\b", re.I)

# Laterality words; "both lungs" / "right and left" / "bilateral" -> bilateral.
_SIDE = re.compile(r"\b(?:right\s+and\s+left|left\s+and\s+right|bilateral\w*|both\s+(?:\w+\s+)?(?:lungs?|lobes?|sides?"
                   r"|hemithora\w*|bases|apices|hil\w*|upper|lower|middle|kidneys|breasts)|either\s+(?:lung|side)"
                   r"|right|left)\b",
                   re.I)
_SIDE_REACH = 80  # characters
_NO_SIDE = frozenset({"Cardiomegaly", "Pericardial effusion", "Arterial wall calcification",
                      "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Hepatic steatosis",
                      "Hepatomegaly", "Splenomegaly", "Aortic aneurysm", "Esophageal wall thickening"})
_LUNG_SIDE = frozenset({"Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                        "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation",
                        "Bronchiectasis", "Interlobular septal thickening", "Pneumothorax", "Pleural thickening",
                        "Pneumonia"})
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
