"""Tokenizers for `vlm`: a tiny offline one for the demo and tests, and the `<image>` token for real ones.

Design choices:
- `build_tokenizer` trains a byte-level BPE with `tokenizers` in well under a second, so the demo and
  every test run without the Hub. Its special tokens cover the markers of every built-in chat template
  (ChatML, Vicuna, Llama 3), so a template never falls back to spelling a marker out in bytes, and
  `<image>` is registered as the named `image_token` (`tokenizer.image_token_id` works, and it survives
  `save_pretrained` / `AutoTokenizer.from_pretrained`).
- The special tokens are added first, in a fixed order, so their ids (0..9) do not depend on the
  training texts; the BPE merges are a deterministic function of the texts.
- A few template header words ("USER", "ASSISTANT", "system", ...) are added to the training texts so
  role headers tokenise into a handful of ids whatever the corpus.
- Real tokenizers (Qwen, LLaMA) lack `<image>`: `ensure_image_token` adds it as a special token and
  the caller resizes the embeddings.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlm.errors import ConfigError

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"

# Order fixes the ids: <|endoftext|> = 0, ..., <image> = 9.
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    IMAGE_TOKEN,
)

# Words the built-in templates put around every turn; training on them keeps headers short.
_TEMPLATE_TEXTS: tuple[str, ...] = (
    "system\nuser\nassistant\n",
    "USER: ASSISTANT: ",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful assistant.",
)

# ChatML as Qwen2 writes it: a default system message when none is given.
CHATML_JINJA = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, *, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on `texts` (deterministic for the same texts).

    Args:
        texts: training corpus (captions, questions, answers). May be empty: the tokenizer then
            knows the 256 bytes, the special tokens and merges from the template words.
        vocab_size: upper bound of the vocabulary (bytes + specials + merges); must exceed 266.
        model_max_length: stored on the tokenizer.

    Returns:
        A `PreTrainedTokenizerFast` with eos = pad = `<|endoftext|>`, `image_token_id`, and a ChatML
        `chat_template`.
    """
    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise ConfigError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {minimum}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(_TEMPLATE_TEXTS) + [str(t) for t in texts]
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as a single vocabulary entry, else None."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (tokenizer.unk_token_id is not None and found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(found)


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special-token strings (named ones and added ones flagged special), sorted; text holding
    one tokenises as that control token unless `split_special_tokens` is asked for."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added))
    return sorted(t for t in found if isinstance(t, str) and t)


def get_image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `<image>` (`tokenizer.image_token_id` when set); ValueError when the tokenizer lacks it."""
    found = getattr(tokenizer, "image_token_id", None)
    if found is None:
        found = token_id(tokenizer, IMAGE_TOKEN)
    if found is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no {IMAGE_TOKEN!r} token; call "
            "vlm.data.tokenizer.ensure_image_token(tokenizer) and resize the model's embeddings"
        )
    return int(found)


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token if absent; return its id. The caller resizes the embeddings."""
    found = token_id(tokenizer, IMAGE_TOKEN)
    if found is None:
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
        found = token_id(tokenizer, IMAGE_TOKEN)
        assert found is not None, "adding <image> to the tokenizer failed"
    return found
