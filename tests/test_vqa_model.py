"""The projector, the splicing of image tokens into the LLM's input, and batched greedy decoding (issue #18)."""

from __future__ import annotations

import pytest
import torch

from mv3dtk.testing.tiny_llama import make_tiny_llama
from mv3dtk.vqa.chat import IGNORE, IMAGE, encode_conversation, encode_prompt
from mv3dtk.vqa.llm import load_llm, stop_ids
from mv3dtk.vqa.model import Projector, VqaModel, splice, supervised_tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TURNS = [{"from": "human", "value": "<image>\nIs there a pleural effusion? <short_answer>", "type": "short_answer"},
         {"from": "gpt", "value": "Yes."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    texts = [TURNS[0]["value"], "Yes.", "No.", "Describe the findings in the lungs.", "The scan shows emphysema."] * 10
    llm_dir = make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", texts, seed=0)
    llm, tok = load_llm(llm_dir)
    torch.manual_seed(0)
    return VqaModel(llm, Projector(16, llm.config.hidden_size)).eval(), tok


def test_projector_is_llavas_mlp2x_gelu():
    p = Projector(16, 32)
    assert [type(m).__name__ for m in p] == ["Linear", "GELU", "Linear"]
    assert (p[0].in_features, p[0].out_features, p[2].in_features, p[2].out_features) == (16, 32, 32, 32)
    assert p[0].bias is not None and p[2].bias is not None
    assert sorted(p.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # LLaVA's mm_projector keys


def test_image_embeddings_land_at_the_sentinel_and_labels_skip_them(tiny):
    model, tok = tiny
    enc = encode_conversation(tok, TURNS)
    short = encode_conversation(tok, [{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "No."}])
    feats = torch.randn(5, 16)
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        x, mask, y = splice(embed, model.projector, [enc.ids, short.ids], [enc.labels, short.labels], [feats, None])
        p = enc.ids.index(IMAGE)
        n = len(enc.ids) - 1 + 5
        assert x.shape[:2] == (2, n) and mask[0].sum() == n and mask[1].sum() == len(short.ids)
        torch.testing.assert_close(x[0, p:p + 5], model.projector(feats))  # the image, in place of the sentinel
        text = torch.tensor([i for i in enc.ids if i != IMAGE])
        torch.testing.assert_close(torch.cat([x[0, :p], x[0, p + 5:n]]), embed(text))  # the text around it
        assert (y[0, p:p + 5] == IGNORE).all()
        assert y[0, :p].tolist() == enc.labels[:p] and y[0, p + 5:n].tolist() == enc.labels[p + 1:]
        assert (x[1, len(short.ids):] == 0).all() and (y[1, len(short.ids):] == IGNORE).all()  # right padding
    supervised = [t for t in y[0].tolist() if t != IGNORE]
    assert tok.decode(supervised) == "Yes.<|eot_id|>"  # the answer and its end-of-turn token only
    assert supervised_tokens([enc.labels]) == len(supervised)


def test_the_summed_loss_is_the_token_mean_times_the_supervised_tokens(tiny):
    model, tok = tiny
    enc = encode_conversation(tok, TURNS)
    feats = torch.randn(5, 16)
    with torch.no_grad():
        x, mask, y = model.embed([enc.ids], [enc.labels], [feats])
        mean = model.llm(inputs_embeds=x, attention_mask=mask, labels=y).loss  # transformers' own shift and mean
        total = model.loss_sum([enc.ids], [enc.labels], [feats])
    torch.testing.assert_close(total / supervised_tokens([enc.labels]), mean)


def test_batched_greedy_decoding_equals_one_at_a_time(tiny):
    """Prompts of different lengths are left-padded: each answer equals the one it gets alone."""
    model, tok = tiny
    prompts = [encode_prompt(tok, [TURNS[0]]),
               encode_prompt(tok, [*TURNS, {"from": "human", "value": "Describe the findings in the lungs."}]),
               encode_prompt(tok, [{"from": "human", "value": "<image>\nDescribe the findings in the lungs."}])]
    feats = [torch.randn(5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stops, pad = stop_ids(tok, model.llm), 0
    together = model.generate(prompts, feats, max_new_tokens=6, stop_ids=stops, pad_id=pad)
    alone = [model.generate([p], [f], max_new_tokens=6, stop_ids=stops, pad_id=pad)[0] for p, f in zip(prompts, feats)]
    assert together == alone
    assert all(0 < len(a) <= 6 for a in alone)
    # and greedy decoding is the argmax of the model's own logits, step by step
    x, mask, _ = model.embed([prompts[0]], [[IGNORE] * len(prompts[0])], [feats[0]])
    with torch.no_grad():
        first = int(model.llm(inputs_embeds=x, attention_mask=mask).logits[0, -1].argmax())
    assert alone[0][0] == first or first in stops
