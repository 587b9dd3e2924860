"""A sentencepiece tokenizer that behaves like LLaMA-2's, trained in a fraction of a second, offline.

LLaMA's `tokenizer.model` is a sentencepiece BPE model with byte fallback, a dummy prefix ("▁" before
the first word), digits split, no normalisation, `<unk>`=0 `<s>`=1 `</s>`=2. We train one with the same
options on chat-like text, save it as a Hugging Face folder the way LLaVA-1.5 / Vicuna checkpoints ship
their tokenizer (`tokenizer.model` + `tokenizer_config.json`, no `tokenizer.json`) and load it through
transformers' `LlamaTokenizer` (transformers 5 converts it with `sentencepiece`), with `legacy` either way.

The corpus glues "USER"/"ASSISTANT" to a tab so that, as in LLaMA-2's vocabulary, "USER" is a piece
but "▁USER" is not ("▁US" + "ER"): LLaVA's `legacy=False` length correction relies on exactly that.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

WORDS = (
    "the a an image shows picture what is this color red green blue circle square triangle how many objects are "
    "there in on left right top bottom of and with describe photo chart table value year families union user "
    "assistant chat between curious artificial intelligence gives helpful detailed polite answers questions"
).split()


def train_llama_sentencepiece(vocab_size: int = 480, seed: int = 0) -> bytes:
    """The serialized sentencepiece model (the bytes of a `tokenizer.model`)."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        lines.append(f"{question.capitalize()}?\tUSER:\tASSISTANT: {answer.capitalize()}. US ER AS SIST ANT 12 3.5")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    return model.getvalue()


def write_llama_tokenizer_folder(folder: str | Path, *, legacy: bool, model: bytes | None = None) -> Path:
    """A LLaVA-1.5-style tokenizer folder: `tokenizer.model` + `tokenizer_config.json` (LlamaTokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model if model is not None else train_llama_sentencepiece())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
