"""The rewrite prompt (MedVista3D, Appendix A), versioned: its hash is recorded with every output
and is part of every cache key, so a changed prompt never reuses old replies."""

from __future__ import annotations

import hashlib
import json

PROMPT_VERSION = "mv3d-rewrite-1"

SYSTEM_PROMPT = (
    "You are a medical expert in radiology, specializing in chest CT. You will read concise image findings, "
    "and then rewrite with improved clarity. Always maintain faithfulness in your rewrite. Do not include new "
    "diagnostic information. Do not include bullet points or any other symbols, or explain your thinking. "
    "Only generate sentences. Rewrite the findings as short, discrete statements of the presence or absence "
    "of abnormalities, one or more abnormalities per sentence, keeping their location."
)

# (findings, rewrite) pairs sent as user/assistant turns before the real text.
FEW_SHOT: tuple[tuple[str, str], ...] = (
    (
        "Subsegmental atelectatic changes are observed in the middle lobe of the right lung. No pleural effusion "
        "or pneumothorax was detected. Heart contour and size are normal.",
        "Subsegmental atelectatic changes were observed in the right lung middle lobe. No pleural effusion is "
        "present. No pneumothorax is present. The heart size is normal.",
    ),
    (
        "Atheromatous plaques were observed in the aorta and coronary arteries. Mediastinal lymph nodes are not "
        "enlarged. A 4 mm nonspecific nodule is seen in the left lower lobe.",
        "Atherosclerosis is present in the aorta and coronary arteries. No lymphadenopathy is present. A 4 mm "
        "nodule is present in the left lung lower lobe.",
    ),
)

USER_TEMPLATE = "Findings: {text}"


def build_messages(text: str) -> list[dict[str, str]]:
    """System prompt, the few-shot turns, then the text to rewrite."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for source, target in FEW_SHOT:
        messages += [{"role": "user", "content": USER_TEMPLATE.format(text=source)},
                     {"role": "assistant", "content": target}]
    messages.append({"role": "user", "content": USER_TEMPLATE.format(text=text)})
    return messages


def prompt_sha() -> str:
    blob = json.dumps([PROMPT_VERSION, SYSTEM_PROMPT, FEW_SHOT, USER_TEMPLATE])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
