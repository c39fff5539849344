"""The labeler's vocabulary (:mod:`mv3dtk.text.labeler`): the phrases of each finding, their vetoes, the
"organ is normal" and vessel rules, the negation / uncertainty triggers and the clause boundaries.

This module is a data table: regular-expression sources and the few compiled patterns that mark clause
ends, positive assertions and sides. The logic that applies them lives in the labeler.
"""

from __future__ import annotations

import re

from ..data.ctrate import ABNORMALITIES

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
