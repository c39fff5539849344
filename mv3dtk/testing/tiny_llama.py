"""A tiny, randomly initialised Llama for tests and demos of ``mv3d vqa-train`` (never used by the product).

:func:`make_tiny_llama` writes a complete local Llama-3-style folder, laid out like a downloaded
Llama-3.1-Instruct, that ``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
offline: ``config.json`` (``LlamaForCausalLM``), ``model.safetensors``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``.

* The tokenizer is a byte-level BPE learnt from ``texts`` by :func:`train_byte_bpe`: every string
  round-trips exactly (``decode(encode(x)) == x``), and the same texts give the same vocabulary (the
  ``tokenizers`` BPE trainer breaks ties by pair ids, which follow the sorted byte alphabet).
* Llama-3's five special tokens come last in the vocabulary, as in the real model; the post-processor
  puts ``<|begin_of_text|>`` in front when ``add_special_tokens=True``, as Llama-3's does (so code that
  renders the chat template, which writes its own BOS, must tokenize with ``add_special_tokens=False``).
* :data:`CHAT_TEMPLATE` is Meta-Llama-3-Instruct's template: headers per role, ``<|eot_id|>`` after each
  message, the BOS before the first one, and the assistant header for ``add_generation_prompt``.
* As in Llama-3.1-Instruct, the tokenizer's EOS is ``<|eot_id|>``, there is no pad token, and the
  generation config stops on ``[<|end_of_text|>, <|eot_id|>]``.

``transformers`` is imported inside :func:`make_tiny_llama`, after the Hugging Face offline switches are
set (it reads them once, when first imported).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..errors import ConfigError
from ..models.text import _offline
from .tiny_models import seeded

__all__ = ["BOS", "CHAT_TEMPLATE", "EOS", "EOT", "SPECIAL_TOKENS", "make_tiny_llama", "train_byte_bpe"]

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT)

# Meta-Llama-3-8B-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_byte_bpe(texts: Iterable[str], vocab_size: int = 600, *, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 split, no prefix space) learnt from ``texts``, with
    :data:`SPECIAL_TOKENS` appended as special tokens and a Llama-3 post-processor (BOS in front).
    At most ``vocab_size`` tokens in all; deterministic for the same texts."""
    n_base = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_base + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size {vocab_size} is too small: a byte-level vocabulary needs at least "
                          f"{n_base + len(SPECIAL_TOKENS)} tokens (256 bytes + {len(SPECIAL_TOKENS)} special)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                  show_progress=False)
    tok.train_from_iterator([str(t) for t in texts], trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids after the learnt vocabulary, as in Llama-3
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny_llama(out_dir: str | Path, texts: Iterable[str], *, seed: int = 0, vocab_size: int = 600,
                    hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    max_position: int = 4096) -> Path:
    """Write a randomly initialised Llama (``hidden_size``, ``layers``, ``heads`` query and ``kv_heads``
    key/value heads, MLP 2 x hidden) with a byte-level BPE vocabulary learnt from ``texts`` as a complete
    local folder (see the module docstring). Same texts and seed -> bit-identical weights and the same
    tokenizer. -> the folder."""
    _offline()  # before transformers is imported: it reads the offline switches once, at import
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok = train_byte_bpe(texts, vocab_size)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, model_max_length=max_position)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(d))
    settings = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"  # what Meta's files say (v5 maps it to its backend)
    _write_json(d / "tokenizer_config.json", settings)

    stops = [ids[EOS], ids[EOT]]
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position, bos_token_id=ids[BOS], eos_token_id=stops,
                         tie_word_embeddings=False)
    model = seeded(seed, lambda: LlamaForCausalLM(config))
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=stops)
    model.save_pretrained(str(d))
    return d


def pretrain_tiny_llama(llm_dir: str | Path, texts: Iterable[str], out_dir: str | Path, *, steps: int = 150,
                        batch_size: int = 8, lr: float = 3e-3, seed: int = 0) -> Path:
    """A short causal language-model pretraining of the Llama in ``llm_dir`` on ``texts`` (each
    ``BOS text \\n``), all weights, AdamW; written with its tokenizer to ``out_dir``. LLaVA's stages start
    from an LLM that knows its language (Vicuna, Llama-3.1); a random tiny Llama does not, and a
    projector alone can then steer it very little. -> ``out_dir``."""
    import shutil

    import torch

    from ..vqa.llm import load_llm

    llm, tok = load_llm(llm_dir)
    llm.train()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr)
    ids = [torch.tensor(tok.encode(str(t) + "\n")) for t in texts]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [ids[i] for i in torch.randint(len(ids), (batch_size,), generator=g).tolist()]
        x = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)  # (B, L)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(b) for b in batch], batch_first=True)  # (B, L)
        llm(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    out = Path(out_dir)
    shutil.copytree(llm_dir, out, dirs_exist_ok=True)
    llm.save_pretrained(str(out))
    return out
