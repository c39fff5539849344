"""Tests for the rule-based report labeler (``mv3dtk.text.labeler``): statuses, scope, laterality,
canonical rewrites, the faithfulness check and agreement with the synthetic dataset's labels."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from mv3dtk.data.ctrate import ABNORMALITIES, labels_csv, read_csv_rows, reports_csv
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.text.labeler import (LABELS, NO_FINDINGS, Mention, canonical_statements, compare, label_text, mentions,
                                 rules_rewrite, split_sentences)

P, A, U = "present", "absent", "uncertain"
ART, COR = "Arterial wall calcification", "Coronary artery wall calcification"
PFS, MOSAIC, IST = "Pulmonary fibrotic sequela", "Mosaic attenuation pattern", "Interlobular septal thickening"

# (sentence, {label: status} = exactly label_text(sentence), {label: side of its final status})
TABLE: list[tuple[str, dict[str, str], dict[str, str | None]]] = [
    # --- CT-RATE / synthetic phrasing
    ("Atelectatic changes were observed in both lungs.", {"Atelectasis": P}, {"Atelectasis": "bilateral"}),
    ("Sequelae changes with fibrotic bands in the right lung middle lobe.", {PFS: P}, {PFS: "right"}),
    ("Millimetric nonspecific nodules were observed in both lungs.", {"Lung nodule": P}, {"Lung nodule": "bilateral"}),
    ("Atheroma plaques in the aorta and coronary arteries.", {ART: P, COR: P}, {ART: None, COR: None}),
    ("Calcific atheromatous plaques are observed.", {ART: P}, {}),
    ("Calcified plaques are seen in the coronary arteries.", {COR: P}, {}),
    ("Coronary artery calcifications are present, mostly along the left anterior descending artery.", {COR: P}, {}),
    ("There are atherosclerotic calcifications in the coronary arterial walls.", {COR: P}, {}),
    ("Minimal calcified plaques are noted in the aortic wall.", {ART: P}, {}),
    ("The thoracic aorta shows no mural calcification.", {ART: A}, {}),
    ("Atherosclerotic calcifications in the aorta, no coronary calcification.", {ART: P, COR: A}, {}),
    ("No lymph node in pathological size and appearance was observed in the mediastinum.",
     {"Lymphadenopathy": A}, {}),
    ("Lymph nodes of pathological size and appearance were observed in the mediastinum.",
     {"Lymphadenopathy": P}, {}),
    ("Heart contour, size are normal.", {"Cardiomegaly": A}, {}),
    ("Pericardial effusion-thickening was not observed.", {"Pericardial effusion": A}, {}),
    ("Pleural effusion-thickening was not detected.", {"Pleural effusion": A, "Pleural thickening": A}, {}),
    ("No pleural effusion or pneumothorax was detected.", {"Pleural effusion": A, "Pneumothorax": A}, {}),
    ("Thoracic esophagus calibration was normal and no significant pathological wall thickening was detected.",
     {"Esophageal wall thickening": A}, {}),
    ("Sliding type hiatal hernia is observed.", {"Hiatal hernia": P}, {}),
    ("Part of the stomach herniates through the esophageal hiatus (hiatal hernia).", {"Hiatal hernia": P}, {}),
    ("Ground glass densities are observed in both lungs.", {"Lung opacity": P}, {"Lung opacity": "bilateral"}),
    ("Mosaic attenuation pattern was observed in both lungs.", {MOSAIC: P}, {MOSAIC: "bilateral"}),
    ("Peribronchial thickening is observed.", {"Peribronchial thickening": P}, {"Peribronchial thickening": None}),
    ("Bronchial wall thickening is observed in the left lung.", {"Peribronchial thickening": P},
     {"Peribronchial thickening": "left"}),
    ("Consolidation areas were observed in the lower lobe of the left lung.", {"Consolidation": P},
     {"Consolidation": "left"}),
    ("Bronchiectasis was observed in the right lower lobe.", {"Bronchiectasis": P}, {"Bronchiectasis": "right"}),
    ("Cylindrical bronchiectatic changes are present in the left lower lobe.", {"Bronchiectasis": P},
     {"Bronchiectasis": "left"}),
    ("Thickened interlobular septa are observed in the periphery of the right lower lobe.", {IST: P}, {IST: "right"}),
    ("Emphysematous changes are observed in both upper lobes.", {"Emphysema": P}, {"Emphysema": "bilateral"}),
    ("A port catheter is observed in the right subclavian vein.", {"Medical material": P},
     {"Medical material": "right"}),
    ("Cardiac pacemaker and sternotomy wires are present.", {"Medical material": P}, {}),
    ("Medical material consistent with a right-sided central venous port is noted.", {"Medical material": P},
     {"Medical material": "right"}),
    ("Heart size is increased; the cardiothoracic ratio is above the normal range.", {"Cardiomegaly": P}, {}),
    ("Fluid is noted in the pericardial space, about 4 mm thick.", {"Pericardial effusion": P}, {}),
    # --- sentences with no label at all
    ("The examination was performed without contrast.", {}, {}),
    ("Patient position is supine.", {}, {}),
    ("Trachea and both main bronchi are open.", {}, {}),
    ("Calcified lymph node in the mediastinum.", {}, {}),
    ("Calcification of the aortic valve.", {}, {}),
    ("Subcutaneous emphysema in the chest wall.", {}, {}),
    ("No significant change compared to the previous examination.", {}, {}),
    ("Non-contrast chest CT was obtained in the axial plane with 1.5 mm slice thickness; coronal and sagittal "
     "reformats were reviewed.", {}, {}),
    # --- negation scope, lists, "no evidence of", "but" / "however" / "although" / "which"
    ("No pleural or pericardial effusion.", {"Pleural effusion": A, "Pericardial effusion": A}, {}),
    ("No pleural effusion, pneumothorax or consolidation.",
     {"Pleural effusion": A, "Pneumothorax": A, "Consolidation": A}, {}),
    ("No focal consolidation, mass or nodule is seen.", {"Consolidation": A, "Mass": A, "Lung nodule": A}, {}),
    ("No evidence of pneumothorax.", {"Pneumothorax": A}, {}),
    ("No opacity is seen in either lung.", {"Lung opacity": A}, {}),
    ("No effusion, but consolidation is present in the left lower lobe.",
     {"Pleural effusion": A, "Consolidation": P}, {"Consolidation": "left"}),
    ("No effusion, consolidation is present.", {"Pleural effusion": A, "Consolidation": P}, {}),
    ("There is no evidence of cardiomegaly, however a small pericardial effusion is seen.",
     {"Cardiomegaly": A, "Pericardial effusion": P}, {}),
    ("No consolidation, although minimal ground-glass opacity is noted in the left lower lobe.",
     {"Consolidation": A, "Lung opacity": P}, {"Lung opacity": "left"}),
    ("Pulmonary nodule, which was not seen on the prior examination, is noted in the right upper lobe.",
     {"Lung nodule": P}, {"Lung nodule": "right"}),
    ("Heart size is increased without pericardial effusion.", {"Cardiomegaly": P, "Pericardial effusion": A}, {}),
    ("Aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected in the lung "
     "parenchyma.", {"Lung nodule": A, "Lung opacity": A}, {}),
    ("No significant change in the size of the nodule in the right upper lobe.", {"Lung nodule": P},
     {"Lung nodule": "right"}),
    ("There is no pneumonic consolidation.", {"Consolidation": A, "Pneumonia": A}, {}),
    ("No mediastinal lymphadenopathy; calcified lymph nodes are present.", {"Lymphadenopathy": A}, {}),
    # --- post-negation
    ("Pleural effusion and pneumothorax were not observed.", {"Pleural effusion": A, "Pneumothorax": A}, {}),
    ("Pleural and pericardial effusion was not observed.", {"Pleural effusion": A, "Pericardial effusion": A}, {}),
    ("Atelectasis and consolidation in the right lower lobe were not observed.",
     {"Atelectasis": A, "Consolidation": A}, {}),
    ("Consolidation in the right lower lobe and pleural effusion was not observed.",
     {"Consolidation": P, "Pleural effusion": A}, {"Consolidation": "right"}),
    ("Pneumothorax is not present.", {"Pneumothorax": A}, {}),
    ("Pleural effusions are absent.", {"Pleural effusion": A}, {}),
    ("Pleural effusion was ruled out.", {"Pleural effusion": A}, {}),
    ("Mediastinal lymph nodes are not enlarged.", {"Lymphadenopathy": A}, {}),
    ("The heart is not enlarged.", {"Cardiomegaly": A}, {}),
    ("Fluid is not seen in the pericardial space.", {"Pericardial effusion": A}, {}),
    # --- organ-normal statements
    ("Heart size is normal, no pericardial effusion.", {"Cardiomegaly": A, "Pericardial effusion": A}, {}),
    ("Cardiac dimensions are within normal limits.", {"Cardiomegaly": A}, {}),
    ("The liver is of normal size.", {"Hepatomegaly": A}, {}),
    ("Liver parenchymal density is normal.", {"Hepatic steatosis": A}, {}),
    ("Thoracic aorta diameter is normal.", {"Aortic aneurysm": A}, {}),
    # --- resolved / regressed / no longer seen
    ("Previously seen pleural effusion has resolved.", {"Pleural effusion": A}, {}),
    ("Consolidation in the right lower lobe has regressed completely.", {"Consolidation": A}, {}),
    ("The nodule in the left upper lobe is no longer seen.", {"Lung nodule": A}, {}),
    ("Pleural effusion has partially resolved.", {"Pleural effusion": P}, {}),
    # --- uncertainty
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}, {}),
    ("Findings suspicious for pneumonia.", {"Pneumonia": U}, {}),
    ("Possible atelectasis in the left lower lobe.", {"Atelectasis": U}, {"Atelectasis": "left"}),
    ("Probable fibrotic sequelae.", {PFS: U}, {}),
    ("Possible small hiatal hernia at the gastroesophageal junction.", {"Hiatal hernia": U}, {}),
    ("Opacity in the right lower lobe, likely atelectasis.", {"Lung opacity": P, "Atelectasis": U},
     {"Lung opacity": "right"}),
    ("Emphysema?", {"Emphysema": U}, {}),
    ("Nodule cannot be ruled out in the right upper lobe.", {"Lung nodule": U}, {"Lung nodule": "right"}),
    ("Cannot exclude a small left pleural effusion.", {"Pleural effusion": U}, {"Pleural effusion": "left"}),
    ("Patchy opacity is noted in the right lower lobe; an infectious process cannot be excluded.",
     {"Lung opacity": P}, {"Lung opacity": "right"}),
    ("Consolidated lung parenchyma is noted in the right upper lobe; pneumonia cannot be excluded.",
     {"Consolidation": P, "Pneumonia": U}, {"Consolidation": "right"}),
    # --- laterality and lists
    ("Atelectasis and consolidation in the right lower lobe.", {"Atelectasis": P, "Consolidation": P},
     {"Atelectasis": "right", "Consolidation": "right"}),
    ("Right pleural effusion and left lower lobe atelectasis.", {"Pleural effusion": P, "Atelectasis": P},
     {"Pleural effusion": "right", "Atelectasis": "left"}),
    ("Bilateral pleural effusion.", {"Pleural effusion": P}, {"Pleural effusion": "bilateral"}),
    ("Pleural effusion on the left side.", {"Pleural effusion": P}, {"Pleural effusion": "left"}),
    ("Right and left lower lobe atelectasis.", {"Atelectasis": P}, {"Atelectasis": "bilateral"}),
    ("Pleural effusion reaching 12 mm in thickness is seen on both sides.", {"Pleural effusion": P},
     {"Pleural effusion": "bilateral"}),
    ("Pleural effusion (right, 12 mm).", {"Pleural effusion": P}, {"Pleural effusion": "right"}),
    # --- extra labels and traps
    ("A 5 mm nodule in the thyroid gland.", {"Thyroid nodule": P}, {}),
    ("The thyroid gland shows no nodule.", {"Thyroid nodule": A}, {}),
    ("Fatty liver.", {"Hepatic steatosis": P}, {}),
    ("Simple cyst in the left kidney.", {"Renal cyst": P}, {"Renal cyst": "left"}),
    ("Old healed fracture of the right 5th rib.", {"Fracture": P}, {"Fracture": "right"}),
    ("Ascending aorta is dilated.", {"Aortic aneurysm": P}, {}),
    ("Mild degenerative changes are noted in the thoracic vertebrae.", {"Vertebral degenerative change": P}, {}),
    ("Bilateral ground-glass opacities, consistent with COVID-19 pneumonia.", {"Lung opacity": P, "Pneumonia": P},
     {"Lung opacity": "bilateral"}),
    ("No pleural effusion. Mild cardiomegaly.", {"Pleural effusion": A, "Cardiomegaly": P}, {}),
    ("Cardiomegaly: absent. Atelectasis: possible. Impression: no consolidation.",
     {"Cardiomegaly": A, "Atelectasis": U, "Consolidation": A}, {}),
]


def _side(text: str, label: str) -> str | None:
    """The label's side as rules_rewrite states it (sides of the mentions that carry the final status)."""
    status = label_text(text)[label]
    sides = {m.side for m in mentions(text) if m.label == label and m.status == status} - {None}
    return "bilateral" if "bilateral" in sides or len(sides) > 1 else next(iter(sides), None)


@pytest.mark.parametrize("text,expected,sides", TABLE, ids=[t[0][:60] for t in TABLE])
def test_table(text, expected, sides):
    assert label_text(text) == expected
    for label, side in sides.items():
        assert _side(text, label) == side, label


@pytest.mark.parametrize("text", [t[0] for t in TABLE], ids=[t[0][:60] for t in TABLE])
def test_rewrite_is_deterministic_and_idempotent(text):
    out = rules_rewrite(text)
    assert out == rules_rewrite(text)
    assert label_text(out) == label_text(text)
    assert rules_rewrite(out) == out  # the canonical text is a fixed point, sides included
    assert compare(text, out) == []


def test_table_is_large_and_covers_every_abnormality():
    assert len(TABLE) >= 60
    seen = {lab for _, exp, _ in TABLE for lab in exp}
    assert set(ABNORMALITIES) <= seen


def test_labels():
    assert LABELS[:18] == ABNORMALITIES
    assert len(set(LABELS)) == len(LABELS)
    assert {"Pneumothorax", "Pleural thickening", "Thyroid nodule", "Hepatic steatosis", "Fracture", "Mass",
            "Aortic aneurysm", "Vertebral degenerative change", "Renal cyst"} <= set(LABELS[18:])


def test_split_sentences():
    text = "A 1.5 mm nodule, e.g. a granuloma, is seen. No effusion!\nHeart normal? Yes.  "
    assert split_sentences(text) == ["A 1.5 mm nodule, e.g. a granuloma, is seen.", "No effusion!", "Heart normal?",
                                     "Yes."]
    assert split_sentences("") == [] and split_sentences("  \n ") == []


def test_mentions_in_text_order_with_sentence():
    text = "No pneumothorax. Right pleural effusion and left lower lobe atelectasis."
    ms = mentions(text)
    assert ms == [Mention("Pneumothorax", A, "No pneumothorax.", None),
                  Mention("Pleural effusion", P, "Right pleural effusion and left lower lobe atelectasis.", "right"),
                  Mention("Atelectasis", P, "Right pleural effusion and left lower lobe atelectasis.", "left")]


def test_present_wins_over_uncertain_over_absent():
    assert label_text("No atelectasis. Possible atelectasis.") == {"Atelectasis": U}
    assert label_text("Possible atelectasis. No atelectasis. Atelectasis in the left lower lobe.") == {"Atelectasis": P}
    assert label_text("") == {} and label_text("Not given.") == {}


def test_canonical_statements():
    labels = {"Pleural effusion": P, "Cardiomegaly": A, "Lung nodule": U, "Medical material": P, "Emphysema": P}
    sides = {"Pleural effusion": "right", "Medical material": "left", "Lung nodule": "left"}
    assert canonical_statements(labels, sides) == [
        "Medical material is present. Medical material is seen on the left.", "Cardiomegaly is not present.",
        "Emphysema is present.", "Lung nodule cannot be excluded.",
        "Pleural effusion is present. Pleural effusion is seen in the right lung."]
    assert canonical_statements({"Pleural effusion": P}) == ["Pleural effusion is present."]
    assert canonical_statements({"Pleural effusion": P}, {"Pleural effusion": "bilateral"}) == [
        "Pleural effusion is present. Pleural effusion is seen in both lungs."]
    assert canonical_statements({"Pleural effusion": A}) == ["Pleural effusion is not present."]
    with pytest.raises(ValueError):
        canonical_statements({"Pleural efusion": P})
    with pytest.raises(ValueError):
        canonical_statements({"Pleural effusion": "maybe"})
    with pytest.raises(ValueError):
        canonical_statements({"Pleural effusion": P}, {"Pleural effusion": "both"})


def test_every_label_round_trips_through_its_canonical_statement():
    for label in LABELS:
        for status in (P, A, U):
            for side in (None, "right", "left", "bilateral"):
                text = " ".join(canonical_statements({label: status}, {label: side}))
                assert label_text(text) == {label: status}, text


def test_rules_rewrite_without_findings():
    assert rules_rewrite("Patient position is supine.") == NO_FINDINGS == "No abnormality is described."
    assert label_text(NO_FINDINGS) == {}
    assert rules_rewrite("") == NO_FINDINGS


def test_rules_rewrite_text():
    src = ("Subsegmental atelectatic changes are observed in the middle lobe of the right lung. No pleural effusion "
           "or pneumothorax was detected. Heart contour and size are normal.")
    assert rules_rewrite(src) == ("Cardiomegaly is not present. Atelectasis is present. Atelectasis is seen in the "
                                  "right lung. Pleural effusion is not present. Pneumothorax is not present.")


SOURCE = ("Right pleural effusion. No pneumothorax. Mild cardiomegaly. Possible atelectasis in the right lower "
          "lobe. Atheromatous plaques in the aorta.")


def test_compare_accepts_a_faithful_paraphrase():
    out = ("There is a small effusion in the right pleural space. The heart is enlarged. Atelectasis cannot be "
           "excluded in the right lower lobe. Atherosclerosis is present in the aortic wall. No pneumothorax.")
    assert compare(SOURCE, out) == []
    assert compare(SOURCE, rules_rewrite(SOURCE)) == []
    # omitting a negative finding, or adding one, is not unfaithful
    assert compare(SOURCE, out.replace(" No pneumothorax.", "") + " No consolidation.") == []


@pytest.mark.parametrize("output,reason", [
    (SOURCE + " A 6 mm nodule is seen in the left upper lobe.",
     "asserts Lung nodule, which the source does not report"),
    (SOURCE + " A large pneumothorax is present.", "asserts Pneumothorax, which the source reports as absent"),
    (SOURCE.replace("Mild cardiomegaly. ", ""), "drops Cardiomegaly (present in the source)"),
    (SOURCE.replace("Mild cardiomegaly.", "Heart size is normal."), "negates Cardiomegaly (present in the source)"),
    (SOURCE.replace("Right pleural", "Left pleural"),
     "changes the side of Pleural effusion (right in the source, left in the output)"),
    (SOURCE.replace("Possible atelectasis", "Atelectasis"), "asserts Atelectasis as certain (uncertain in the source)"),
    (SOURCE.replace("Possible atelectasis", "No atelectasis"), "negates Atelectasis (uncertain in the source)"),
    (SOURCE.replace("Mild cardiomegaly.", "Cardiomegaly cannot be excluded."),
     "hedges Cardiomegaly (present in the source)"),
    (SOURCE.replace("Atheromatous plaques in the aorta.", ""), f"drops {ART} (present in the source)"),
])
def test_compare_flags(output, reason):
    assert compare(SOURCE, output) == [reason]


def test_compare_reason_kinds():
    reasons = compare("Cardiomegaly. Right pleural effusion. Emphysema.",
                      "No cardiomegaly. Left pleural effusion. Lung nodule. ")
    assert sorted(r.split(" ", 1)[0] for r in reasons) == ["asserts", "changes", "drops", "negates"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_train=12, n_valid=4, shape=(16, 32, 32), seed=0)
    rows = []
    for split in ("train", "valid"):
        reports = {r["VolumeName"]: r for r in read_csv_rows(root / reports_csv(split))}
        for lab in read_csv_rows(root / labels_csv(split)):
            rep = reports[lab["VolumeName"]]
            rows.append((rep["Findings_EN"] + " " + rep["Impressions_EN"], {a: int(lab[a]) for a in ABNORMALITIES}))
    return rows


def test_synthetic_labels_agree(synthetic):
    confusion: Counter = Counter()
    for text, truth in synthetic:
        got = label_text(text)
        for a in ABNORMALITIES:
            confusion[a, truth[a], int(got.get(a) in (P, U))] += 1
    cells = sum(confusion.values())
    agree = sum(n for (_, t, p), n in confusion.items() if t == p)
    assert cells == len(synthetic) * 18 and len(synthetic) >= 16
    wrong = {k: n for k, n in confusion.items() if k[1] != k[2]}
    assert agree / cells >= 0.97, wrong  # 1.0 at the time of writing


def test_synthetic_rewrites_are_idempotent_and_faithful(synthetic):
    for text, _ in synthetic:
        out = rules_rewrite(text)
        assert label_text(out) == label_text(text)
        assert compare(text, out) == []


# What "the labeler is light" means, counted rather than timed (a fresh interpreter, so nothing is
# imported or compiled before): the import adds only standard-library modules and mv3dtk.text itself;
# every regex it uses is compiled once, at import, and only the ones it keeps; labeling and comparing
# reports compile none (a pattern built per call would be a compile per sentence once re's cache fills).
_LIGHT_PROBE = r"""
import json, re, re._compiler as rc, sys
compiled = []
_real = rc.compile
def _counting(p, flags=0):
    compiled.append(p)
    return _real(p, flags)
rc.compile = _counting
import mv3dtk.data.ctrate  # the package and its CLI side (Click) are already there for every caller
before, n_before = set(sys.modules), len(compiled)
import mv3dtk.text.labeler as lab, mv3dtk.text.vocab as voc
at_import = len(compiled) - n_before

def patterns(x, seen):
    if isinstance(x, re.Pattern):
        seen.add(id(x))
    elif isinstance(x, dict):
        for v in x.values():
            patterns(v, seen)
    elif isinstance(x, (tuple, list)):
        for v in x:
            patterns(v, seen)
    return seen

kept = set()
for m in (lab, voc):
    patterns(list(vars(m).values()), kept)
for text in json.load(sys.stdin):
    lab.label_text(text); lab.rules_rewrite(text); lab.compare(text, lab.rules_rewrite(text)); lab.mentions(text)
print(json.dumps({"new": sorted(set(sys.modules) - before), "all": sorted(sys.modules), "at_import": at_import,
                  "kept": len(kept), "while_labeling": compiled[n_before + at_import:]}))
"""
HEAVY = ("numpy", "torch", "polars", "pyarrow", "duckdb", "scipy", "transformers", "monai", "nibabel", "pandas")


def test_import_is_light_and_compiles_every_regex_once():
    texts = [t[0] for t in TABLE] + [SOURCE]
    proc = subprocess.run([sys.executable, "-c", _LIGHT_PROBE], input=json.dumps(texts), capture_output=True,
                          text=True, check=True, timeout=120)
    got = json.loads(proc.stdout)
    foreign = sorted({m if m.startswith("mv3dtk") else m.split(".")[0] for m in got["new"]
                      if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[:2] != ["mv3dtk", "text"]})
    assert foreign == [], f"importing mv3dtk.text.labeler pulled in non-stdlib modules: {foreign}"
    assert {"mv3dtk.text.labeler", "mv3dtk.text.vocab"} <= set(got["new"])
    assert [m for m in got["all"] if m.split(".")[0] in HEAVY] == []
    assert 0 < got["at_import"] <= got["kept"], got  # compiled at import, nothing compiled and thrown away
    assert got["while_labeling"] == [], f"{len(got['while_labeling'])} regexes compiled per call while labeling"
