"""encode_sample / encode_prompt: exact label masks, image expansion, placeholder rules, truncation, drop reasons."""

from __future__ import annotations

import copy

import pytest

from vlm.data.conversation import IGNORE_INDEX, encode_prompt, encode_sample
from vlm.data.errors import SampleError
from vlm.data.templates import get_template
from vlm.data.tokenizer import IMAGE_TOKEN

TEMPLATE_NAMES = ["plain", "vicuna_v1", "chatml", "llama3", "tokenizer"]
SAMPLE_NAMES = ["single_image", "system_two_images", "text_only"]
N_IMG = 5


def _image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of image ids."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _collapse_runs(ids: list[int], image_id: int) -> list[int]:
    return [t for k, t in enumerate(ids) if t != image_id or k == 0 or ids[k - 1] != image_id]


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
@pytest.mark.parametrize("sample_name", SAMPLE_NAMES)
def test_supervised_tokens_are_exactly_the_replies(tiny_tokenizer, conversation_samples, template_name, sample_name):
    sample = conversation_samples[sample_name]
    encoded = encode_sample(sample, tiny_tokenizer, template_name, num_image_tokens=N_IMG)
    assert len(encoded.input_ids) == len(encoded.labels)
    supervised = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(encoded.input_ids, encoded.labels))
    template = get_template(template_name)
    end_of_turn = template.end_of_turn_token(tiny_tokenizer)
    # vicuna's replies start with the space after "ASSISTANT:" (LLaVA supervises it with the reply)
    expected = "".join(template.reply_prefix + m["content"] + end_of_turn
                       for m in sample["messages"] if m["role"] == "assistant")
    assert tiny_tokenizer.decode(supervised) == expected
    # the end-of-turn closing each reply is one supervised token (plain's newline is text, not a marker)
    if template.end_of_turn_is_token:
        eot_id = tiny_tokenizer.convert_tokens_to_ids(end_of_turn)
        assert supervised.count(eot_id) == sum(m["role"] == "assistant" for m in sample["messages"])


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
@pytest.mark.parametrize("sample_name", SAMPLE_NAMES)
def test_each_image_becomes_one_run_at_its_placeholder(tiny_tokenizer, conversation_samples, template_name, sample_name):
    sample = conversation_samples[sample_name]
    image_id = tiny_tokenizer.image_token_id
    encoded = encode_sample(sample, tiny_tokenizer, template_name, num_image_tokens=N_IMG)
    runs = _image_runs(encoded.input_ids, image_id)
    assert [length for _, length in runs] == [N_IMG] * len(sample["images"])
    assert encoded.num_images == len(sample["images"]) and not encoded.image_prepended
    assert all(encoded.labels[s + k] == IGNORE_INDEX for s, n in runs for k in range(n))
    # collapsing each run to one id gives the rendered text with <image> at the placeholder's spot
    text = tiny_tokenizer.decode(_collapse_runs(encoded.input_ids, image_id))
    for message in get_template(template_name).place_images(sample["messages"]):
        if message["role"] == "user" and (template_name != "plain" or IMAGE_TOKEN in message["content"]):
            shown = message["content"] if template_name != "plain" else IMAGE_TOKEN * message["content"].count(IMAGE_TOKEN)
            assert shown in text


def test_chatml_matches_the_tokenizer_chat_template_text(tiny_tokenizer, conversation_samples):
    sample = conversation_samples["system_two_images"]
    image_id = tiny_tokenizer.image_token_id
    encoded = encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=N_IMG)
    reference = tiny_tokenizer.apply_chat_template(sample["messages"], tokenize=False)
    assert tiny_tokenizer.decode(_collapse_runs(encoded.input_ids, image_id)) == reference


def test_single_image_without_placeholder_is_prepended_to_first_user_turn(tiny_tokenizer):
    sample = {
        "id": "p",
        "images": ["a.png"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is it?"},
            {"role": "assistant", "content": "a circle"},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "red"},
        ],
    }
    encoded = encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=N_IMG)
    assert encoded.image_prepended and encoded.num_images == 1
    text = tiny_tokenizer.decode(_collapse_runs(encoded.input_ids, tiny_tokenizer.image_token_id))
    assert "<|im_start|>user\n<image>\nWhat is it?<|im_end|>" in text
    assert text.count(IMAGE_TOKEN) == 1


@pytest.mark.parametrize(
    "images, contents, counts",
    [
        ([], ["<image>\nWhat?"], "1 <image> placeholder(s) in the text but 0 image(s)"),
        (["a.png"], ["<image> and <image>"], "2 <image> placeholder(s) in the text but 1 image(s)"),
        (["a.png", "b.png"], ["What?"], "0 <image> placeholder(s) in the text but 2 image(s)"),
        (["a.png", "b.png", "c.png"], ["<image> <image>"], "2 <image> placeholder(s) in the text but 3 image(s)"),
    ],
)
def test_placeholder_mismatch_names_both_counts(tiny_tokenizer, images, contents, counts):
    messages = [{"role": "user", "content": contents[0]}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(SampleError) as info:
        encode_sample({"id": "m", "images": images, "messages": messages}, tiny_tokenizer, "chatml", num_image_tokens=2)
    assert info.value.reason == "placeholder_mismatch"
    assert counts in info.value.detail


def test_image_placeholder_in_assistant_turn_is_a_mismatch(tiny_tokenizer):
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "see <image>"}]
    with pytest.raises(SampleError) as info:
        encode_sample({"id": "m", "images": ["a", "b"], "messages": messages}, tiny_tokenizer, "chatml", num_image_tokens=2)
    assert info.value.reason == "placeholder_mismatch" and "assistant" in info.value.detail


@pytest.mark.parametrize(
    "roles, reason",
    [
        (["assistant", "user"], "bad_roles"),
        (["user", "user", "assistant"], "bad_roles"),
        (["user", "assistant", "system", "user", "assistant"], "bad_roles"),
        (["user", "assistant", "user"], "bad_roles"),
        (["human", "gpt"], "bad_roles"),
        (["user"], "no_supervised_tokens"),
        (["system", "user"], "no_supervised_tokens"),
    ],
)
def test_role_order_is_checked(tiny_tokenizer, roles, reason):
    messages = [{"role": r, "content": f"text {i}"} for i, r in enumerate(roles)]
    with pytest.raises(SampleError) as info:
        encode_sample({"id": "r", "images": [], "messages": messages}, tiny_tokenizer, "vicuna_v1", num_image_tokens=2)
    assert info.value.reason == reason
    assert info.value.sample_id == "r"


@pytest.mark.parametrize("empty", ["", "  \n"])
def test_empty_turn(tiny_tokenizer, conversation_samples, empty):
    sample = copy.deepcopy(conversation_samples["text_only"])
    sample["messages"][3]["content"] = empty
    with pytest.raises(SampleError) as info:
        encode_sample(sample, tiny_tokenizer, "llama3", num_image_tokens=2)
    assert info.value.reason == "empty_turn" and "message 3" in info.value.detail


def test_bad_schema(tiny_tokenizer):
    for sample in ({"id": "s"}, {"id": "s", "messages": [{"role": "user", "content": 3}]}, {"id": "s", "messages": []}):
        with pytest.raises(SampleError) as info:
            encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=2)
        assert info.value.reason == "bad_schema"


def test_too_long_without_truncation_reports_lengths(tiny_tokenizer, conversation_samples):
    sample = conversation_samples["system_two_images"]
    full = encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=N_IMG)
    assert encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=N_IMG, max_length=len(full.input_ids)).input_ids == full.input_ids
    with pytest.raises(SampleError) as info:
        encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=N_IMG, max_length=len(full.input_ids) - 1)
    assert info.value.reason == "too_long"
    assert f"{len(full.input_ids)} tokens" in info.value.detail and str(len(full.input_ids) - 1) in info.value.detail


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_truncate_turns_keeps_whole_pairs_and_whole_images(tiny_tokenizer, conversation_samples, template_name):
    sample = conversation_samples["system_two_images"]
    image_id = tiny_tokenizer.image_token_id
    full = encode_sample(sample, tiny_tokenizer, template_name, num_image_tokens=N_IMG)
    first_pair = {**sample, "images": sample["images"][:1], "messages": sample["messages"][:3]}
    first = encode_sample(first_pair, tiny_tokenizer, template_name, num_image_tokens=N_IMG)
    # every limit between "first pair fits" and "everything fits" keeps exactly the first pair
    for max_length in range(len(first.input_ids), len(full.input_ids)):
        kept = encode_sample(sample, tiny_tokenizer, template_name, num_image_tokens=N_IMG, max_length=max_length, truncate="turns")
        assert len(kept.input_ids) <= max_length
        assert full.input_ids[: len(kept.input_ids)] == kept.input_ids
        assert kept.num_images == 1
        assert [n for _, n in _image_runs(kept.input_ids, image_id)] == [N_IMG]
        supervised = tiny_tokenizer.decode([t for t, label in zip(kept.input_ids, kept.labels) if label != IGNORE_INDEX])
        template = get_template(template_name)
        assert supervised == template.reply_prefix + "2" + template.end_of_turn_token(tiny_tokenizer)
    # the kept pair may lack the first pair's trailing separator (tokenizer template); one less never fits
    shortest = min(len(kept.input_ids), len(first.input_ids))
    with pytest.raises(SampleError) as info:
        encode_sample(sample, tiny_tokenizer, template_name, num_image_tokens=N_IMG, max_length=shortest - 1, truncate="turns")
    assert info.value.reason == "too_long"


def test_max_length_inside_an_image_run_never_cuts_it(tiny_tokenizer, conversation_samples):
    sample = conversation_samples["single_image"]
    full = encode_sample(sample, tiny_tokenizer, "vicuna_v1", num_image_tokens=N_IMG)
    run_start = full.input_ids.index(tiny_tokenizer.image_token_id)
    for truncate in ("none", "turns"):
        with pytest.raises(SampleError) as info:
            encode_sample(sample, tiny_tokenizer, "vicuna_v1", num_image_tokens=N_IMG, max_length=run_start + 2, truncate=truncate)
        assert info.value.reason == "too_long"


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_prompt_is_the_training_prefix_up_to_the_last_reply(tiny_tokenizer, conversation_samples, template_name):
    sample = conversation_samples["system_two_images"]
    encoded = encode_sample(sample, tiny_tokenizer, template_name, num_image_tokens=N_IMG)
    prompt = encode_prompt(sample["messages"][:-1], tiny_tokenizer, template_name, num_image_tokens=N_IMG)
    reply_start = max(k for k, label in enumerate(encoded.labels) if label == IGNORE_INDEX and k + 1 < len(encoded.labels) and encoded.labels[k + 1] != IGNORE_INDEX) + 1
    assert prompt == encoded.input_ids[:reply_start]


def test_prompt_prepends_a_single_image_like_training(tiny_tokenizer):
    messages = [{"role": "user", "content": "What color is the circle?"}]
    with_image = encode_prompt(messages, tiny_tokenizer, "chatml", num_image_tokens=3, num_images=1)
    assert _image_runs(with_image, tiny_tokenizer.image_token_id) == [(with_image.index(tiny_tokenizer.image_token_id), 3)]
    assert tiny_tokenizer.decode(with_image).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.image_token_id not in encode_prompt(messages, tiny_tokenizer, "chatml", num_image_tokens=3)
    with pytest.raises(SampleError):
        encode_prompt(messages + [{"role": "assistant", "content": "red"}], tiny_tokenizer, "chatml", num_image_tokens=3)


def test_bad_arguments_raise_value_error(tiny_tokenizer, conversation_samples):
    sample = conversation_samples["single_image"]
    with pytest.raises(ValueError, match="truncate"):
        encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=2, truncate="left")
    with pytest.raises(ValueError, match="num_image_tokens"):
        encode_sample(sample, tiny_tokenizer, "chatml", num_image_tokens=0)
    with pytest.raises(ValueError, match="valid names"):
        encode_sample(sample, tiny_tokenizer, "alpaca", num_image_tokens=2)


def _metaspace_tokenizer():
    """A sentencepiece-style tokenizer (LLaMA/Vicuna family): '▁' marks spaces, a prefix space is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["A chat between a curious human and an artificial intelligence assistant.",
              "USER: What color is the circle? ASSISTANT: red. How many shapes are there? 2 3 yes no"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>"])
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", extra_special_tokens={"image_token": "<image>"})


@pytest.mark.parametrize("tokenizer_kind,template_name",
                         [("byte_level", "vicuna_v1"), ("byte_level", "chatml"), ("metaspace", "vicuna_v1")])
def test_ids_equal_whole_string_tokenisation(tiny_tokenizer, tokenizer_kind, template_name):
    """Training ids are what tokenising the rendered text in one go gives (as LLaVA does), not a
    piece-by-piece tokenisation with extra boundaries; the labels still select exactly the replies."""
    tokenizer = tiny_tokenizer if tokenizer_kind == "byte_level" else _metaspace_tokenizer()
    sample = {"id": "t", "images": [], "messages": [
        {"role": "user", "content": "What color is the circle?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "2"}]}
    template = get_template(template_name, tokenizer)
    encoded = encode_sample(sample, tokenizer, template, num_image_tokens=N_IMG)
    groups = template.render(sample["messages"], tokenizer)
    text = "".join(p.text for group in groups for p in group)
    expected = template.leading_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == expected
    supervised = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    text = "".join(tokenizer.convert_ids_to_tokens(supervised)).replace("▁", " ").replace("Ġ", " ")
    eot = template.end_of_turn_token(tokenizer)
    assert text == f"{template.reply_prefix}red{eot}{template.reply_prefix}2{eot}"
