"""VQA token sequences (mv3dtk.vqa.chat) with a tiny Llama-3-style tokenizer and its real chat template:
labels cover exactly the answers and their end-of-turn token, the image sentinel replaces ``<image>``,
and the prompt for generation is exactly the prefix training saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.errors import ConfigError
from mv3dtk.testing.tiny_llama import BOS, EOT, make_tiny_llama
from mv3dtk.vqa.chat import (IGNORE, IMAGE, IMAGE_TEXT, Encoded, encode_conversation, encode_plain, encode_prompt,
                             truncate)

SYSTEM = "You are CT-CHAT, a radiology assistant. <provided>"
TURNS = [
    {"from": "human", "value": "<image>\nWhat abnormalities are seen in this chest CT? <long_answer>",
     "type": "free_response"},
    {"from": "gpt", "value": "The scan shows atelectasis and a small pleural effusion."},
    {"from": "human", "value": "Is there evidence of atelectasis? <short_answer>", "type": "short_answer"},
    {"from": "gpt", "value": "Yes."},
    {"from": "human", "value": "Which is present? (a) Atelectasis (b) Pleural effusion (c) Hernia (d) Nodule "
                               "<multiple_choice>", "type": "multiple_choice"},
    {"from": "gpt", "value": "(a) Atelectasis"},
]
REPORT = "Band-like atelectasis is present in the right lower lobe.\nNo pleural effusion."


@pytest.fixture(scope="module")
def synth_items(tmp_path_factory) -> list[dict]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=3, n_valid=1, shape=(16, 16, 16),
                                  seed=0).root
    return [it for f in sorted((root / "dataset" / "vqa").glob("*.json"))
            for it in json.loads(f.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, synth_items) -> Path:
    texts = [t["value"] for it in synth_items for t in it["conversations"]] + [t["value"] for t in TURNS] + [REPORT]
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama", texts * 3, seed=0)


@pytest.fixture(scope="module")
def tok(llm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)


def spans(enc: Encoded) -> list[list[int]]:
    """The runs of supervised labels, in order."""
    out, run = [], []
    for label in enc.labels + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            out.append(run)
            run = []
    return out


def messages(turns, system=None) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": roles[t["from"]], "content": t["value"]} for t in turns]


def as_text(tok, ids: list[int]) -> str:
    """The ids back as text, the sentinel written as ``<image>``."""
    parts, run = [], []
    for i in ids + [IMAGE]:
        if i == IMAGE:
            parts.append(tok.decode(run, skip_special_tokens=False))
            run = []
        else:
            run.append(i)
    return IMAGE_TEXT.join(parts)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_labels_are_exactly_each_answer_and_its_end_of_turn_token(tok, system):
    enc = encode_conversation(tok, TURNS, system=system)
    assert len(enc.ids) == len(enc.labels)
    assert [tok.decode(s, skip_special_tokens=False) for s in spans(enc)] == [
        t["value"] + EOT for t in TURNS if t["from"] == "gpt"]
    for i, label in zip(enc.ids, enc.labels):  # a supervised label is its own token id (the model shifts)
        assert label in (IGNORE, i)


def test_the_sequence_is_the_chat_template_rendering_with_the_sentinel_at_image(tok):
    enc = encode_conversation(tok, TURNS, system=SYSTEM)
    assert enc.ids.count(IMAGE) == 1 and enc.labels[enc.ids.index(IMAGE)] == IGNORE
    rendered = tok.apply_chat_template(messages(TURNS, SYSTEM), tokenize=False)
    assert as_text(tok, enc.ids) == rendered
    assert as_text(tok, enc.ids[:enc.ids.index(IMAGE) + 1]).endswith("<|end_header_id|>\n\n" + IMAGE_TEXT)
    assert enc.ids.count(tok.convert_tokens_to_ids(BOS)) == 1  # the template's BOS only, not the tokenizer's too


def test_the_image_may_sit_in_a_later_human_turn(tok):
    turns = [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."},
             {"from": "human", "value": "Now look: <image> what is there?"}, {"from": "gpt", "value": "A nodule."}]
    enc = encode_conversation(tok, turns)
    p = enc.ids.index(IMAGE)
    assert as_text(tok, enc.ids[:p]).endswith("Now look: ") and as_text(tok, enc.ids[p + 1:]).startswith(" what")
    assert [tok.decode(s) for s in spans(enc)] == ["Hi." + EOT, "A nodule." + EOT]


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_prompt_ids_equal_the_prefix_training_saw(tok, system):
    enc = encode_conversation(tok, TURNS, system=system)
    starts = [k for k in range(len(enc.labels)) if enc.labels[k] != IGNORE and (k == 0 or enc.labels[k - 1] == IGNORE)]
    for n, start in zip(range(1, len(TURNS), 2), starts, strict=True):
        prompt = encode_prompt(tok, TURNS[:n], system=system)
        assert prompt == enc.ids[:start]  # the answer to turn n starts right where the prompt ends
        assert as_text(tok, prompt) == tok.apply_chat_template(messages(TURNS[:n], system), tokenize=False,
                                                               add_generation_prompt=True)


def test_every_synthetic_conversation_encodes(tok, synth_items):
    for item in synth_items:
        turns = item["conversations"]
        enc = encode_conversation(tok, turns)
        assert enc.ids.count(IMAGE) == 1
        assert [tok.decode(s) for s in spans(enc)] == [t["value"].strip() + EOT for t in turns[1::2]]
        assert encode_prompt(tok, turns[:-1]) == enc.ids[:len(encode_prompt(tok, turns[:-1]))]


def test_a_trailing_question_is_left_out_and_text_only_conversations_work(tok):
    assert encode_conversation(tok, TURNS + [{"from": "human", "value": "And?"}]) == encode_conversation(tok, TURNS)
    text_only = encode_conversation(tok, [{"from": "human", "value": "What is atelectasis?"},
                                          {"from": "gpt", "value": "A collapse of lung."}])
    assert IMAGE not in text_only.ids and [tok.decode(s) for s in spans(text_only)] == ["A collapse of lung." + EOT]


def test_plain_is_bos_image_report_newline_eos(tok):
    enc = encode_plain(tok, "  " + REPORT + "\n")
    body = tok.encode(REPORT + "\n", add_special_tokens=False)
    assert enc.ids == [tok.bos_token_id, IMAGE, *body, tok.eos_token_id]
    assert enc.labels == [IGNORE, IGNORE, *body, tok.eos_token_id]
    assert tok.decode(spans(enc)[0], skip_special_tokens=False) == REPORT + "\n" + tok.eos_token


@pytest.mark.parametrize("turns, match", [
    ([], "at least one turn"),
    ([{"from": "gpt", "value": "Yes."}], "turn 0"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "Q2?"}], "turn 1"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": 3}], "turn 1"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>"},
      {"from": "gpt", "value": "B"}], "once"),
    ([{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "See <image>."}], "human turn"),
    ([{"from": "human", "value": "<image>\nQ?"}], "answer"),
])
def test_malformed_conversations_are_refused(tok, turns, match):
    with pytest.raises(ConfigError, match=match):
        encode_conversation(tok, turns)


def test_a_prompt_must_end_with_a_question(tok):
    with pytest.raises(ConfigError, match="end with a human turn"):
        encode_prompt(tok, TURNS)


def test_a_template_that_rerenders_history_is_refused(llm_dir):
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    odd.chat_template = ("{{ bos_token }}[{{ messages | length }} messages]{% for m in messages %}{{ m['role'] }}: "
                         "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="chat template renders a conversation differently"):
        encode_conversation(odd, TURNS)
    with pytest.raises(ConfigError, match="chat template"):
        encode_prompt(odd, TURNS[:3])


def test_truncate_keeps_the_start_and_drops_what_cannot_be_learnt(tok):
    enc = encode_conversation(tok, TURNS)
    assert truncate(enc, len(enc.ids)) == enc and truncate(enc, 10 ** 6) == enc
    first = next(k for k, label in enumerate(enc.labels) if label != IGNORE)
    cut = truncate(enc, first + 2)
    assert cut == Encoded(enc.ids[:first + 2], enc.labels[:first + 2])
    assert truncate(enc, first) is None  # no supervised label left
    assert truncate(enc, 0) is None and truncate(enc, -3) is None
    image_last = Encoded([1, 2, 3, IMAGE], [IGNORE, 2, 3, IGNORE])
    assert truncate(image_last, 3) is None  # the sentinel was cut away
    assert truncate(Encoded([1, 2, 3], [IGNORE, 2, 3]), 2) == Encoded([1, 2], [IGNORE, 2])  # text only: no sentinel
    with pytest.raises(ValueError):
        Encoded([1, 2], [IGNORE])
