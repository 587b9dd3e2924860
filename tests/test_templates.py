"""Chat template registry and formats, the tokenizer-template span finder, and the offline tokenizer."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlm.data.conversation import encode_sample
from vlm.data.templates import ALIASES, TEMPLATES, VICUNA_SYSTEM, get_template
from vlm.data.tokenizer import (
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
    ensure_image_token,
    get_image_token_id,
)

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": "a circle"},
    {"role": "user", "content": "Colour?"},
    {"role": "assistant", "content": "red"},
]


def _text(template_name, tokenizer, messages, **kwargs):
    groups = get_template(template_name, tokenizer).render(messages, tokenizer, **kwargs)
    return "".join(piece.text for group in groups for piece in group)


def _supervised(template_name, tokenizer, messages):
    groups = get_template(template_name, tokenizer).render(messages, tokenizer)
    return [piece.text for group in groups for piece in group if piece.supervised]


@pytest.mark.parametrize(
    "alias, name",
    [("v1", "vicuna_v1"), ("vicuna_v1", "vicuna_v1"), ("llava_v1", "llava_v1"), ("plain", "plain"), ("qwen", "chatml"),
     ("qwen_2", "chatml"), ("chatml", "chatml"), ("llama3", "llama3"), ("llava_llama_3", "llama3"), ("tokenizer", "tokenizer")],
)
def test_llava_version_aliases(alias, name):
    assert get_template(alias).name == name


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_template("mpt")
    for name in list(TEMPLATES) + list(ALIASES):
        assert name in str(info.value)


def test_vicuna_v1_is_llava_conv_vicuna_v1(tiny_tokenizer):
    # LLaVA-1.5's conv_vicuna_v1 system text (llava/conversation.py), not conv_llava_v1's "curious human"
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                             "gives helpful, detailed, and polite answers to the user's questions.")
    assert _text("vicuna_v1", tiny_tokenizer, CONVERSATION) == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: a circle</s>USER: Colour? ASSISTANT: red</s>"
    )
    # the space after "ASSISTANT:" is supervised with the reply, and the generation prompt ends at the colon,
    # exactly where LLaVA-1.5's prompt ends
    assert _supervised("vicuna_v1", tiny_tokenizer, CONVERSATION) == [" a circle</s>", " red</s>"]
    prompt = _text("vicuna_v1", tiny_tokenizer, [{"role": "system", "content": "S"}, *CONVERSATION[:3]], add_generation_prompt=True)
    assert prompt == "S USER: <image>\nWhat is it? ASSISTANT: a circle</s>USER: Colour? ASSISTANT:"


def test_chatml_is_qwen_format(tiny_tokenizer):
    assert _text("chatml", tiny_tokenizer, CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\na circle<|im_end|>\n"
    )
    assert _supervised("chatml", tiny_tokenizer, CONVERSATION) == ["a circle<|im_end|>", "red<|im_end|>"]


def test_llama3_format(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, *CONVERSATION[:2]]
    assert _text("llama3", tiny_tokenizer, messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na circle<|eot_id|>"
    )


def test_plain_keeps_only_images_and_replies(tiny_tokenizer):
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Describe <image> please"},
                {"role": "assistant", "content": "A red circle."}]
    # LLaVA's preprocess_plain: image + caption + "\n" (its conv_llava_plain separator), no eos
    assert _text("plain", tiny_tokenizer, messages) == "<image>A red circle.\n"
    assert _supervised("plain", tiny_tokenizer, messages) == ["A red circle.\n"]


def test_tokenizer_template_finds_reply_spans(tiny_tokenizer):
    assert _supervised("tokenizer", tiny_tokenizer, CONVERSATION) == ["a circle<|im_end|>", "red<|im_end|>"]
    assert _text("tokenizer", tiny_tokenizer, CONVERSATION) == tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.fixture
def tokenizer_with_template():
    """Builds a tiny tokenizer with the given chat_template."""

    def make(chat_template):
        tokenizer = build_tokenizer([], vocab_size=300)
        tokenizer.chat_template = chat_template
        return tokenizer

    return make


def test_tokenizer_template_errors_are_clear(tokenizer_with_template):
    sample = {"id": "x", "images": [], "messages": CONVERSATION[2:]}
    no_template = tokenizer_with_template(None)
    with pytest.raises(ValueError, match="chat_template"):
        encode_sample(sample, no_template, "tokenizer", num_image_tokens=2)
    # rewrites earlier turns: only the last assistant reply keeps its text
    rewriting = tokenizer_with_template(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[hidden]"
        "{% else %}{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
    )
    long_sample = {"id": "x", "images": [], "messages": [{"role": "user", "content": "q"}] + CONVERSATION[1:]}
    with pytest.raises(ValueError, match="prefix by prefix"):
        encode_sample(long_sample, rewriting, "tokenizer", num_image_tokens=2)
    no_end_token = tokenizer_with_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="no special token"):
        encode_sample(sample, no_end_token, "tokenizer", num_image_tokens=2)
    stripping = tokenizer_with_template("{% for m in messages %}{{ m['content'] | upper }}<|eot_id|>{% endfor %}")
    with pytest.raises(ValueError, match="cannot be located"):
        encode_sample(sample, stripping, "tokenizer", num_image_tokens=2)


def _bare_tokenizer(special_tokens: list[str]) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["hello there"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=special_tokens[0])


def test_template_needs_its_markers_in_the_tokenizer():
    tokenizer = _bare_tokenizer(["</s>"])
    with pytest.raises(ValueError, match=re.escape("<|im_start|>")):
        get_template("qwen", tokenizer)
    assert get_template("plain", tokenizer).end_of_turn == "\n"  # plain text, needs no marker


def test_build_tokenizer_is_deterministic_and_has_every_marker(tiny_tokenizer, tiny_corpus):
    again = build_tokenizer(tiny_corpus, vocab_size=512)
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    assert [tiny_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.image_token_id == get_image_token_id(tiny_tokenizer) == SPECIAL_TOKENS.index(IMAGE_TOKEN)
    for name in TEMPLATES:
        get_template(name, tiny_tokenizer)  # binds: every marker is one token
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer([], vocab_size=100)


def test_tokenizer_round_trips_through_save_pretrained(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n"
    assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert reloaded.image_token_id == tiny_tokenizer.image_token_id
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    assert reloaded.eos_token_id == tiny_tokenizer.eos_token_id and reloaded.pad_token_id == tiny_tokenizer.pad_token_id


def test_ensure_image_token_adds_it_once():
    tokenizer = _bare_tokenizer(["</s>"])
    with pytest.raises(ValueError, match="ensure_image_token"):
        get_image_token_id(tokenizer)
    size = len(tokenizer)
    image_id = ensure_image_token(tokenizer)
    assert image_id == size and len(tokenizer) == size + 1
    assert ensure_image_token(tokenizer) == image_id and len(tokenizer) == size + 1
    assert get_image_token_id(tokenizer) == image_id
    assert tokenizer("a<image>b", add_special_tokens=False)["input_ids"].count(image_id) == 1
