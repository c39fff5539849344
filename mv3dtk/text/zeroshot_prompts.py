"""Zero-shot prompts, in one place: CT-CLIP's ``"{label} is present."`` / ``"{label} is not present."``
pair for each of the 18 CT-RATE abnormalities (reference: ctclip-fvlm.md §3).

Used by ``mv3d index-texts`` (origin ``prompt``) and by zero-shot evaluation, so both embed exactly
the same strings. Importing this module is cheap (no torch).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from ..data.ctrate import ABNORMALITIES
from ..errors import ConfigError

CTCLIP_TEMPLATES: tuple[str, str] = ("{} is present.", "{} is not present.")


class PromptPair(NamedTuple):
    label: str
    positive: str
    negative: str


def ctclip_prompts(labels: Iterable[str] = ABNORMALITIES,
                   templates: tuple[str, str] = CTCLIP_TEMPLATES) -> list[PromptPair]:
    """``[(label, positive_text, negative_text), ...]`` in the order of ``labels``.

    >>> ctclip_prompts(["Emphysema"])
    [PromptPair(label='Emphysema', positive='Emphysema is present.', negative='Emphysema is not present.')]
    """
    if len(templates) != 2 or any(t.count("{}") != 1 for t in templates):
        raise ConfigError(f"prompt templates must be two strings with one '{{}}' each (positive, negative), "
                          f"e.g. {CTCLIP_TEMPLATES}; got {templates!r}")
    pos, neg = templates
    return [PromptPair(label, pos.format(label), neg.format(label)) for label in labels]
