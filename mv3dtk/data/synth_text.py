"""Report text, RadGenome region sentences and CT-CHAT-style VQA for the synthetic dataset.

Every sentence is tied to a region path (RadGenome ``Anatomy``) so the same sentences feed the
report, the region CSV and the VQA. Contract with the labels (tested): a positive abnormality is
always described in Findings (with its drawn side, lobe and size); a negative one is never claimed
present; where it is mentioned at all, the sentence carries a negation ("no", "not", "normal"...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mv3dtk.data.ctrate import ABNORMALITIES, NOT_GIVEN, REGIONS
from mv3dtk.data.phantom import Finding


@dataclass(frozen=True)
class Sentence:
    anatomy: str  # RadGenome region path, first component in REGIONS
    text: str


@dataclass(frozen=True)
class Report:
    clinical: str
    technique: str
    findings: str
    impressions: str
    sentences: tuple[Sentence, ...]  # the findings, in report order


# Positive templates. Fields: {loc} "the right upper lobe" | "both upper lobes", {lung} "the right
# lung" | "both lungs", {side} "right" | "left" | "bilateral", {size} mm, {station} node stations.
POSITIVE: dict[str, tuple[str, ...]] = {
    "Medical material": (
        "A port catheter is present in the right anterior chest wall with its tip in the superior vena cava.",
        "Port catheter on the right; the catheter tip is located at the cavoatrial junction.",
        "Medical material consistent with a right-sided central venous port is noted.",
        "A central venous catheter is seen, with its reservoir in the right anterior chest wall.",
    ),
    "Arterial wall calcification": (
        "Atherosclerotic calcifications are seen in the wall of the thoracic aorta.",
        "Calcific atherosclerotic plaques are present in the aortic arch and descending aorta.",
        "There are mural calcifications in the thoracic aorta.",
        "Minimal calcified plaques are noted in the aortic wall.",
    ),
    "Cardiomegaly": (
        "Cardiomegaly is present.",
        "The heart is enlarged.",
        "Heart size is increased; the cardiothoracic ratio is above the normal range.",
        "The cardiac contour is enlarged, consistent with cardiomegaly.",
    ),
    "Pericardial effusion": (
        "Pericardial effusion is seen, measuring up to {size} mm in thickness.",
        "There is a pericardial effusion surrounding the heart.",
        "Minimal pericardial fluid is present.",
        "Fluid is noted in the pericardial space, about {size} mm thick.",
    ),
    "Coronary artery wall calcification": (
        "Calcified plaques are seen in the coronary arteries.",
        "Coronary artery calcifications are present, mostly along the left anterior descending artery.",
        "There are atherosclerotic calcifications in the coronary arterial walls.",
    ),
    "Hiatal hernia": (
        "A hiatal hernia is seen.",
        "Part of the stomach herniates through the esophageal hiatus (hiatal hernia).",
        "A sliding hiatal hernia measuring about {size} mm is present at the distal esophagus.",
        "Possible small hiatal hernia at the gastroesophageal junction.",
    ),
    "Lymphadenopathy": (
        "Enlarged lymph nodes are seen in {station_regions}.",
        "Mediastinal lymphadenopathy is present ({station}).",
        "Pathologically enlarged {station} lymph nodes are noted, the largest measuring {size} mm.",
        "Multiple mediastinal lymph nodes of increased size are observed.",
    ),
    "Emphysema": (
        "Emphysematous changes are seen in {loc}.",
        "There is centrilobular emphysema, more prominent in {loc}.",
        "Areas of emphysema are observed in {lung}.",
        "Mild emphysema is present in {loc}.",
    ),
    "Atelectasis": (
        "Atelectasis is seen at the base of {loc}.",
        "Subsegmental atelectasis in the posterior basal segment of {loc}.",
        "Minimal atelectatic changes are noted at the base of {lung}.",
        "Band-like atelectasis is present in {loc}.",
    ),
    "Lung nodule": (
        "{A_size} mm nodule is seen in {loc}.",
        "{Loc} contains a nodular density measuring {size} mm.",
        "A solid pulmonary nodule of {size} mm is noted in {loc}.",
        "There is {a_size} mm nodule in {loc}; follow-up is recommended.",
    ),
    "Lung opacity": (
        "Ground-glass opacity is seen in {loc}.",
        "There are ground glass densities in {lung}.",
        "Patchy opacity is noted in {loc}; an infectious process cannot be excluded.",
        "Faint areas of increased opacity are present in {loc}.",
    ),
    "Pulmonary fibrotic sequela": (
        "Fibrotic sequelae changes are seen in {loc}.",
        "Linear fibrotic bands consistent with sequelae are present in {lung}.",
        "Parenchymal sequela changes with fibrosis are observed in {loc}.",
    ),
    "Pleural effusion": (
        "{Side} pleural effusion is present.",
        "Pleural fluid is seen {side_on}, measuring {size} mm in depth.",
        "There is a {severity} {side} pleural effusion.",
        "Pleural effusion reaching {size} mm in thickness is seen {side_on}.",
    ),
    "Mosaic attenuation pattern": (
        "A mosaic attenuation pattern is seen in {lung}.",
        "Mosaic attenuation is present in {lung}.",
        "Heterogeneous lung parenchyma with a mosaic attenuation pattern is noted in {lung}.",
    ),
    "Peribronchial thickening": (
        "Peribronchial thickening is seen in {lung}.",
        "Bronchial wall thickening is observed in {lung}.",
        "There is peribronchial wall thickening in the central airways of {lung}.",
    ),
    "Consolidation": (
        "Consolidation is seen in {loc}.",
        "An area of consolidation with air bronchograms is seen in {loc}.",
        "Consolidated lung parenchyma is noted in {loc}; pneumonia cannot be excluded.",
    ),
    "Bronchiectasis": (
        "Bronchiectasis is seen in {loc}.",
        "Cylindrical bronchiectatic changes are present in {loc}.",
        "Dilated bronchi consistent with bronchiectasis are noted in {lung}.",
    ),
    "Interlobular septal thickening": (
        "Interlobular septal thickening is seen in {lung}.",
        "Thickened interlobular septa are observed in the periphery of {loc}.",
        "There is smooth interlobular septal thickening in {lung}.",
    ),
}

# Explicit denials (each carries a negation) for a negative abnormality.
NEGATIVE: dict[str, tuple[str, ...]] = {
    "Medical material": ("No medical device or foreign material is seen.",),
    "Arterial wall calcification": ("No atherosclerotic calcification is seen in the aortic wall.",
                                    "The thoracic aorta shows no mural calcification."),
    "Cardiomegaly": ("Heart size is normal.", "The heart contour is within normal limits.",
                     "Cardiac dimensions are within normal limits."),
    "Pericardial effusion": ("No pericardial effusion is seen.", "Pericardial effusion was not observed.",
                             "No fluid is present in the pericardial space."),
    "Coronary artery wall calcification": ("No coronary artery calcification is seen.",),
    "Hiatal hernia": ("No hiatal hernia is seen.", "There is no hiatal hernia."),
    "Lymphadenopathy": ("No mediastinal lymphadenopathy.", "No pathologically enlarged lymph nodes are "
                        "detected in the mediastinum.", "Mediastinal lymph nodes are not enlarged."),
    "Emphysema": ("No emphysema is seen.", "There is no emphysematous change."),
    "Atelectasis": ("No atelectasis is seen.",),
    "Lung nodule": ("No pulmonary nodule is seen.", "No nodular lesion was detected in either lung."),
    "Lung opacity": ("No ground-glass opacity is seen.", "There is no parenchymal opacity."),
    "Pulmonary fibrotic sequela": ("No fibrotic sequelae are seen.",),
    "Pleural effusion": ("No pleural effusion.", "There is no pleural effusion on either side.",
                         "Pleural effusion was not detected."),
    "Mosaic attenuation pattern": ("No mosaic attenuation pattern is seen.",),
    "Peribronchial thickening": ("No peribronchial thickening is seen.",),
    "Consolidation": ("No consolidation is seen.", "There is no pneumonic consolidation."),
    "Bronchiectasis": ("No bronchiectasis is seen.",),
    "Interlobular septal thickening": ("No interlobular septal thickening is seen.",),
}

# Normal statements per region, used when nothing abnormal is located there.
NORMAL: dict[str, tuple[tuple[str, str], ...]] = {
    "trachea and bronchie": (("trachea and bronchie", "Trachea and both main bronchi are open."),
                             ("trachea and bronchie", "The trachea and main bronchi are patent."),
                             ("trachea and bronchie", "Central airways are patent and of normal calibre.")),
    "mediastinum": (("mediastinum", "Mediastinal structures are within normal limits."),
                    ("mediastinum/aorta", "The thoracic aorta is of normal calibre."),
                    ("mediastinum", "Mediastinal main vascular structures have a normal course and width.")),
    "heart": (("heart", "The heart has a normal appearance."),),
    "esophagus": (("esophagus", "The esophagus is of normal calibre."),
                  ("esophagus", "Thoracic esophagus calibre is normal.")),
    "thyroid": (("thyroid", "The thyroid gland is of normal size and attenuation."),
                ("thyroid", "Thyroid lobes are unremarkable."),
                ("thyroid", "Visualized portions of the thyroid gland are normal.")),
    "breast": (("breast", "No mass is seen in the breast tissue."),
               ("breast", "Both breasts are unremarkable within the field of view.")),
    "bone": (("bone", "No lytic or destructive lesion is seen in the bony structures."),
             ("bone/bone/vertebrae", "Mild degenerative changes are noted in the thoracic vertebrae."),
             ("bone", "Bone structures are intact within the scan area.")),
    "abdomen": (("abdomen/abdomen/liver", "The liver is of normal size in the visualized sections."),
                ("abdomen", "Upper abdominal organs within the sections are unremarkable."),
                ("abdomen/abdomen/liver", "Liver parenchymal density is normal.")),
    "lung": (("lung", "Both lungs are normally aerated."), ("lung", "Lung parenchyma is normal."),
             ("lung", "The lungs are clear.")),
    "pleura": (("pleura", "Pleural spaces are clear."), ("pleura", "No pleural thickening is seen.")),
}

# Where each abnormality's sentence belongs ("{lungpath}" = the side's lung fine anatomy).
ANATOMY_OF: dict[str, str] = {
    "Medical material": "mediastinum", "Arterial wall calcification": "mediastinum/aorta",
    "Cardiomegaly": "heart", "Pericardial effusion": "heart", "Coronary artery wall calcification": "heart",
    "Hiatal hernia": "esophagus", "Lymphadenopathy": "mediastinum", "Pleural effusion": "pleura",
}
LUNG_REGION_ABN = {a for a in ABNORMALITIES if a not in ANATOMY_OF}
SHORT_NAME = {a: a.lower() for a in ABNORMALITIES}

CLINICAL = ("Cough.", "Shortness of breath for two weeks.", "Follow-up of a pulmonary nodule.",
            "Fever and cough; COVID-19 suspicion.", "Chest pain.", "Known malignancy, staging.",
            "Dyspnea on exertion.")
IMPRESSION_NORMAL = ("No significant pathology.", "Normal chest CT.", "No acute cardiopulmonary finding.")


def _lung_path(side: str | None) -> str:
    return {"right": "lung/lung/right lung", "left": "lung/lung/left lung"}.get(side or "", "lung")


def _fields(f: Finding) -> dict[str, str]:
    side = f.side or "right"
    lobe = f.lobe or "lower"
    loc = f"both {lobe} lobes" if side == "both" else f"the {side} {lobe} lobe"
    lung = "both lungs" if side == "both" else f"the {side} lung"
    side_w = "bilateral" if side == "both" else side
    size = "" if f.size_mm is None else f"{f.size_mm:g}"
    a_size = ("an " if size[:1] == "8" or size[:2] in ("11", "18") else "a ") + size
    stations = f.station or "mediastinal"
    regions = f"the {stations} region" + ("s" if " and " in stations else "")
    return {"loc": loc, "Loc": loc[0].upper() + loc[1:], "lung": lung, "side": side_w,
            "Side": side_w.capitalize(), "size": size,
            "side_on": "on both sides" if side == "both" else f"on the {side} side", "severity": f.severity,
            "a_size": a_size, "A_size": a_size.capitalize(), "station": stations, "station_regions": regions}


def positive_sentence(f: Finding, rng: np.random.Generator) -> Sentence:
    options = [t for t in POSITIVE[f.name] if "size}" not in t or f.size_mm is not None]
    text = str(rng.choice(options)).format(**_fields(f))
    anatomy = ANATOMY_OF.get(f.name) or _lung_path(f.side)
    return Sentence(anatomy, text)


def _negative_sentences(labels: dict[str, int], rng) -> list[Sentence]:
    out = []
    for name in ABNORMALITIES:
        if labels[name] == 0 and rng.random() < 0.35:
            anatomy = ANATOMY_OF.get(name, "lung")
            out.append(Sentence(anatomy, str(rng.choice(NEGATIVE[name]))))
    return out


def _normal_sentences(findings: dict[str, Finding], rng) -> list[Sentence]:
    busy = {ANATOMY_OF.get(n, "lung").split("/")[0] for n in findings}
    out = []
    for region, options in NORMAL.items():
        if region not in busy and rng.random() < 0.85:
            anatomy, text = options[int(rng.integers(len(options)))]
            out.append(Sentence(anatomy, text))
    return out


def _impression(findings: dict[str, Finding], rng) -> str:
    if rng.random() < 0.12:
        return NOT_GIVEN
    if not findings:
        return str(rng.choice(IMPRESSION_NORMAL))
    parts = []
    for f in findings.values():
        extra = [w for w in (_fields(f)["side"] if f.side else "", f"{f.size_mm:g} mm" if f.size_mm else "") if w]
        parts.append(f.name + (f" ({', '.join(extra)})." if extra else "."))
    return " ".join(parts)


def make_report(labels: dict[str, int], findings: dict[str, Finding], slice_mm: float,
                rng: np.random.Generator) -> Report:
    """A full report for one scan; ``findings`` holds exactly the positive, drawn abnormalities."""
    pos = [positive_sentence(findings[n], rng) for n in ABNORMALITIES if labels[n]]
    rest = _normal_sentences(findings, rng) + _negative_sentences(labels, rng)
    sentences = pos + rest
    order = rng.permutation(len(sentences))
    sentences = [sentences[i] for i in order]
    clinical = NOT_GIVEN if rng.random() < 0.3 else str(rng.choice(CLINICAL))
    technique = NOT_GIVEN if rng.random() < 0.15 else (
        f"Non-contrast chest CT was obtained in the axial plane with {slice_mm:g} mm slice thickness; "
        "coronal and sagittal reformats were reviewed.")
    findings_text = " ".join(s.text for s in sentences)
    return Report(clinical, technique, findings_text, _impression(findings, rng), tuple(sentences))


# ---------------------------------------------------------------------------------------------
# RadGenome region sentences
# ---------------------------------------------------------------------------------------------
def region_rows(volume: str, report: Report) -> list[tuple[str, str, str]]:
    """(Volumename, Anatomy, Sentence) rows: the whole report first, then one per anatomy path."""
    whole = report.findings if report.impressions == NOT_GIVEN else f"{report.findings} {report.impressions}"
    rows = [(volume, "", whole)]
    grouped: dict[str, list[str]] = {}
    for s in report.sentences:
        grouped.setdefault(s.anatomy, []).append(s.text)
    key = lambda a: (REGIONS.index(a.split("/")[0]), a)  # noqa: E731
    for anatomy in sorted(grouped, key=key):
        rows.append((volume, anatomy, " ".join(grouped[anatomy])))
    return rows


# ---------------------------------------------------------------------------------------------
# CT-CHAT / LLaVA VQA
# ---------------------------------------------------------------------------------------------
def _turns(question: str, answer: str, kind: str, token: str, first: bool) -> list[dict]:
    prefix = "<image>\n" if first else ""
    return [{"from": "human", "value": f"{prefix}{question} {token}", "type": kind},
            {"from": "gpt", "value": answer}]


def _long_answer(report: Report, findings: dict, rng) -> tuple[str, str]:
    lung = [s.text for s in report.sentences if s.anatomy.startswith("lung")]
    if lung and rng.random() < 0.5:
        return "Describe the findings in the lungs.", " ".join(lung)
    if findings:
        names = ", ".join(SHORT_NAME[n] for n in findings)
        return "What abnormalities are seen in this chest CT?", f"The scan shows {names}."
    return "What abnormalities are seen in this chest CT?", "No significant abnormality is seen in this scan."


def _short_answer(labels: dict[str, int], rng) -> tuple[str, str]:
    want = int(rng.random() < 0.5)
    pool = [n for n in ABNORMALITIES if labels[n] == want] or list(ABNORMALITIES)
    name = str(rng.choice(pool))
    return f"Is there evidence of {SHORT_NAME[name]} in this scan?", "Yes." if labels[name] else "No."


def _multiple_choice(labels: dict[str, int], rng) -> tuple[str, str]:
    pos = [n for n in ABNORMALITIES if labels[n]]
    neg = [n for n in ABNORMALITIES if not labels[n]]
    if pos and len(neg) >= 3:
        q, right, wrong = "Which of the following abnormalities is present in this scan?", str(rng.choice(pos)), neg
    elif not pos:
        q, right, wrong = "Which of the following best describes this scan?", "No abnormality", neg
    else:
        q, right, wrong = "Which of the following abnormalities is NOT present in this scan?", str(rng.choice(neg)), pos
    options = [right] + [str(x) for x in rng.choice(wrong, size=3, replace=False)]
    options = [options[i] for i in rng.permutation(4)]
    letters = "abcd"
    inline = " ".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
    k = options.index(right)
    return f"{q} {inline}", f"({letters[k]}) {right}"


def vqa_items(volume: str, labels: dict[str, int], report: Report, findings: dict, rng) -> list[dict]:
    """Two items per volume: a 3-turn conversation (long, short, MC) and a report-generation turn."""
    stem = volume[: -len(".nii.gz")]
    conv = _turns(*_long_answer(report, findings, rng), "free_response", "<long_answer>", True)
    conv += _turns(*_short_answer(labels, rng), "short_answer", "<short_answer>", False)
    conv += _turns(*_multiple_choice(labels, rng), "multiple_choice", "<multiple_choice>", False)
    rep = _turns("Generate a radiology report for this chest CT.", report.findings, "report_generation",
                 "<report_generation>", True)
    return [{"id": f"{stem}_qa", "image": volume, "conversations": conv},
            {"id": f"{stem}_report", "image": volume, "conversations": rep}]


def question_items(volume: str, labels: dict[str, int], rng, n: int) -> dict:
    """One more conversation about ``volume``: ``n`` short-answer and ``n`` multiple-choice turns drawn from its
    labels, in CT-CHAT's schema. CT-RATE's VQA set asks dozens of questions per scan, synth's files three;
    a benchmark that needs more questions per scan draws them here (``benchmarks/vqa.py --questions``)."""
    conv = []
    for i in range(n):
        conv += _turns(*_short_answer(labels, rng), "short_answer", "<short_answer>", not conv)
        conv += _turns(*_multiple_choice(labels, rng), "multiple_choice", "<multiple_choice>", False)
    return {"id": f"{volume[: -len('.nii.gz')]}_questions", "image": volume, "conversations": conv}
