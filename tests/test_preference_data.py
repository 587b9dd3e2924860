"""Preference data (issue 13 point 1): the preference sample contract, its drop reasons, the readers (TRL's
format compared with TRL's own prompt extraction and chat-template rendering, LLaVA-style, RLAIF-V tables)."""

from __future__ import annotations

import pytest

from vlm.data.check import check_dataset, check_sample, encode_preference_sides
from vlm.data.errors import REASONS, SampleError
from vlm.data.paths import ImageFolder
from vlm.data.sample import validate_sample

CHECK = dict(template="vicuna_v1", num_image_tokens=4, max_length=80)


def pair(sample_id: str, chosen="red", rejected="blue", question="<image>\nWhat color is the circle?",
         images=("ok.png",), **extra) -> dict:
    sample = {"id": sample_id, "images": list(images), "messages": [{"role": "user", "content": question}],
              "chosen": chosen, "rejected": rejected}
    sample.update(extra)
    return sample


def test_validate_sample_accepts_a_preference_sample_and_only_it_may_end_with_a_user_turn():
    good = pair("p")
    assert validate_sample(good) is good
    with_system = pair("s", meta={"source": "x"})
    with_system["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    validate_sample(with_system)
    supervised_unanswered = {k: v for k, v in good.items() if k not in ("chosen", "rejected")}
    with pytest.raises(SampleError) as e:
        validate_sample(supervised_unanswered)
    assert e.value.reason == "no_supervised_tokens"  # without chosen/rejected a prompt alone trains nothing
    answered_prompt = pair("a")
    answered_prompt["messages"].append({"role": "assistant", "content": "red"})
    with pytest.raises(SampleError) as e:
        validate_sample(answered_prompt)
    assert e.value.reason == "bad_roles" and "must end with a user message" in e.value.detail


@pytest.mark.parametrize("change, reason", [
    (dict(chosen="red", rejected=" red\n"), "same_answers"),
    (dict(chosen="   "), "empty_answer"),
    (dict(rejected=""), "empty_answer"),
    (dict(rejected=None), "bad_schema"),
    (dict(chosen=["red"]), "bad_schema"),
])
def test_pair_drop_reasons(change, reason):
    sample = pair("x", **change)
    with pytest.raises(SampleError) as e:
        validate_sample(sample)
    assert e.value.reason == reason and reason in REASONS


def test_a_pair_needs_both_answers():
    sample = pair("x")
    del sample["rejected"]
    with pytest.raises(SampleError) as e:
        validate_sample(sample)
    assert e.value.reason == "bad_schema" and "'rejected'" in e.value.detail


def test_check_dataset_reports_preference_reasons_like_training(data_image_folder, tiny_tokenizer):
    long_answer = "A red circle next to a green square on a white background. " * 6
    samples = [
        pair("ok"),
        pair("text_only", question="Is there a blue triangle?", chosen="yes", rejected="no", images=()),
        pair("same", chosen="red", rejected="red "),
        pair("empty", rejected="  "),
        pair("missing", images=("nowhere.png",)),
        pair("corrupt", images=("corrupt.png",)),
        pair("two_placeholders", question="<image> and <image>: same?"),
        pair("long_rejected", rejected=long_answer),  # the longer side decides too_long
        pair("long_chosen", chosen=long_answer),
    ]
    kept, report = check_dataset(samples, image_folder=str(data_image_folder), tokenizer=tiny_tokenizer, **CHECK)
    got = {p["id"]: p["reason"] for p in report["problems"]}
    assert got == {"same": "same_answers", "empty": "empty_answer", "missing": "missing_image",
                   "corrupt": "unreadable_image", "two_placeholders": "placeholder_mismatch",
                   "long_rejected": "too_long", "long_chosen": "too_long"}
    assert kept == [0, 1]
    assert report["dropped"] == {"missing_image": 1, "unreadable_image": 1, "placeholder_mismatch": 1,
                                 "too_long": 2, "empty_answer": 1, "same_answers": 1}
    by_id = {p["id"]: p for p in report["problems"]}
    assert "prompt + rejected" in by_id["long_rejected"]["detail"]
    # the same function training calls gives the same reason
    for sample in samples[2:]:
        with pytest.raises(SampleError) as e:
            check_sample(sample, ImageFolder(data_image_folder), tiny_tokenizer, "vicuna_v1", image_check="full",
                         num_image_tokens=4, max_length=80)
        assert e.value.reason == got[sample["id"]]


def test_a_multi_turn_pair_under_plain_is_dropped_in_the_report_not_mid_run(data_image_folder, tiny_tokenizer):
    # `plain` writes replies back to back, so a multi-turn prompt's final reply cannot be told apart: the up-front
    # check (the report) drops the pair with the reason training would give, instead of a crash hours in
    multi = pair("multi", messages=[{"role": "user", "content": "<image>\nIs there a blue square?"},
                                    {"role": "assistant", "content": "no"},
                                    {"role": "user", "content": "What color is the circle?"}])
    kept, report = check_dataset([pair("single"), multi], image_folder=str(data_image_folder),
                                 tokenizer=tiny_tokenizer, **{**CHECK, "template": "plain"})
    assert kept == [0]
    assert report["dropped"] == {"template_mismatch": 1}
    assert "final reply cannot be told apart" in report["problems"][0]["detail"]
    _, report = check_dataset([multi], image_folder=str(data_image_folder), tokenizer=tiny_tokenizer, **CHECK)
    assert report["dropped"] == {}  # a chat template separates the replies


def test_preference_sides_are_the_prompt_with_each_answer(tiny_tokenizer, data_image_folder):
    from vlm.data.conversation import encode_sample

    sample = pair("ok", chosen="red", rejected="green")
    chosen, rejected = encode_preference_sides(sample, tiny_tokenizer, "vicuna_v1", num_image_tokens=4)
    for side, answer in ((chosen, "red"), (rejected, "green")):
        supervised = {"id": "ok", "images": ["ok.png"],
                      "messages": sample["messages"] + [{"role": "assistant", "content": answer}]}
        expected = encode_sample(supervised, tiny_tokenizer, "vicuna_v1", num_image_tokens=4)
        assert side.input_ids == expected.input_ids and side.labels == expected.labels
    encoded, _ = check_sample(sample, ImageFolder(data_image_folder), tiny_tokenizer, "vicuna_v1",
                              num_image_tokens=4)
    assert encoded.input_ids == chosen.input_ids


# ---------------------------------------------------------------- readers: TRL's format, against TRL itself

# A chat template in llava-hf's manner: an image part renders as "<image>\n" before its text, string content as is.
LLAVA_HF_LIKE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
USER, ASSISTANT, SYSTEM = ({"role": r, "content": c} for r, c in (("user", "What color is the circle?"),
                                                                   ("assistant", "red"),
                                                                   ("system", "Answer in one word.")))
TRL_RECORDS = {
    "conversational": {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "blue"}],
                       "images": ["ok.png"]},
    "conversational_system_image": {"prompt": [SYSTEM, USER], "chosen": [ASSISTANT],
                                    "rejected": [{"role": "assistant", "content": "green"}], "image": "ok.png"},
    "parts": {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "Same colour?"}]}],
              "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
              "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
              "images": ["ok.png", "sub/ok2.png"]},
    "implicit_multi_turn": {"chosen": [USER, ASSISTANT, {"role": "user", "content": "And the square?"},
                                       {"role": "assistant", "content": "green"}],
                            "rejected": [USER, ASSISTANT, {"role": "user", "content": "And the square?"},
                                         {"role": "assistant", "content": "red"}]},
    "text_prompt_conversational_answers": {"prompt": "What color is the circle?",  # TRL extracts from the answers
                                           "chosen": [USER, ASSISTANT],
                                           "rejected": [USER, {"role": "assistant", "content": "blue"}]},
}
TRL_TEXT_RECORDS = {
    "text": {"prompt": "<image>\nWhat color is the circle?", "chosen": "red", "rejected": "blue",
             "images": ["ok.png"]},
    "text_implicit": {"chosen": "Q: What color is the circle? A: red", "rejected": "Q: What color is the circle? A: blue"},
}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = LLAVA_HF_LIKE_TEMPLATE
    return tokenizer


def read_records(write_data, name: str, records: list[dict]) -> list:
    from vlm.data.formats import detect_format, read_source

    path = write_data(name, records)
    assert detect_format(path) == "trl_preference"
    return list(read_source(path))


def test_trl_conversational_records_render_as_trl_renders_them(write_data, chat_tokenizer):
    """TRL's own functions (maybe_extract_prompt, prepare_multimodal_messages, apply_chat_template: what its
    DPOTrainer and vision collator do) give the same prompt and answers as our samples rendered with the same
    chat template, for explicit, implicit, system, one/two-image and content-part records."""
    from trl.data_utils import apply_chat_template, maybe_extract_prompt, prepare_multimodal_messages

    samples = read_records(write_data, "trl.jsonl", list(TRL_RECORDS.values()))
    for (name, record), sample in zip(TRL_RECORDS.items(), samples):
        validate_sample(sample)
        example = maybe_extract_prompt({k: v for k, v in record.items() if k not in ("images", "image")})
        images = record.get("images", [record["image"]] if "image" in record else [])
        example["prompt"] = prepare_multimodal_messages(example["prompt"], images=images)
        example["chosen"] = prepare_multimodal_messages(example["chosen"])
        example["rejected"] = prepare_multimodal_messages(example["rejected"])
        trl = apply_chat_template(example, chat_tokenizer)
        ours_prompt = chat_tokenizer.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)
        assert ours_prompt == trl["prompt"], name
        for key in ("chosen", "rejected"):
            full = chat_tokenizer.apply_chat_template(
                sample["messages"] + [{"role": "assistant", "content": sample[key]}], tokenize=False)
            assert full == trl["prompt"] + trl[key], (name, key)
        assert sample["images"] == images, name


def test_trl_text_records_give_trl_prompt_and_answers(write_data):
    from trl.data_utils import maybe_extract_prompt

    samples = read_records(write_data, "trl_text.json", list(TRL_TEXT_RECORDS.values()))
    for (name, record), sample in zip(TRL_TEXT_RECORDS.items(), samples):
        trl = maybe_extract_prompt({k: v for k, v in record.items() if k != "images"})
        assert sample["messages"] == [{"role": "user", "content": trl["prompt"].strip()}], name
        assert (sample["chosen"], sample["rejected"]) == (trl["chosen"].strip(), trl["rejected"].strip()), name
    assert samples[1]["messages"][0]["content"] == "Q: What color is the circle? A:" and samples[1]["chosen"] == "red"


def test_trl_records_that_cannot_be_a_pair_are_bad_schema(write_data):
    from vlm.data.formats import read_source

    records = [{"prompt": [USER], "chosen": [ASSISTANT, USER], "rejected": [ASSISTANT]},  # multi-turn completion
               {"prompt": "Hi?", "chosen": "hello", "rejected": None},
               {"prompt": "Hi?", "chosen": "hello", "rejected": "bye", "images": {"not": "a path"}}]
    errors = list(read_source(write_data("bad.jsonl", records), format="trl_preference"))
    assert [type(e) for e in errors] == [SampleError] * 3 and {e.reason for e in errors} == {"bad_schema"}
    assert "one assistant message" in errors[0].detail and "'rejected'" in errors[1].detail


# ---------------------------------------------------------------- readers: LLaVA-style


def test_llava_style_preference_records(write_data, data_image_folder, tiny_tokenizer, capsys):
    from vlm.data.formats import detect_format, read_source

    records = [
        {"id": "a", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"}],
         "chosen": "red", "rejected": "blue", "question_type": "color"},
        {"id": "b", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "1"},
            {"from": "human", "value": "What color is it?"}], "chosen": "red", "rejected": "green"},
        {"id": "c", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
         "chosen": "x", "rejected": "y"},  # ends with a reply: not a prompt
    ]
    path = write_data("pairs.json", records)
    assert detect_format(path) == "llava_preference"  # not llava, though it has `conversations`
    a, b, c = read_source(path)
    assert a == {"id": "a", "images": ["ok.png"], "messages": [{"role": "user", "content": "<image>\nWhat color?"}],
                 "meta": {"question_type": "color"}, "chosen": "red", "rejected": "blue"}
    assert [m["role"] for m in b["messages"]] == ["user", "assistant", "user"] and b["chosen"] == "red"
    from vlm.data.mix import Source

    kept, report = check_dataset(Source(str(path), str(data_image_folder)), tokenizer=tiny_tokenizer, **CHECK)
    assert kept == [0, 1] and report["dropped"] == {"bad_roles": 1}
    assert report["notes"]["sources"][0]["format"] == "llava_preference"
    # supervised training on these pairs trains on prompt + chosen, and says so (vlm.train.dataset)
    from vlm.train.dataset import _say_pairs_train_as_chosen

    _say_pairs_train_as_chosen(report)
    said = capsys.readouterr().out
    assert f"data: {path} holds preference pairs (llava_preference): --method sft trains on each prompt with its " \
           "chosen answer" in said
    _, plain = check_dataset([pair("p")], image_folder=str(data_image_folder), tokenizer=tiny_tokenizer, **CHECK)
    _say_pairs_train_as_chosen(plain)  # in-memory samples, no source format: nothing said
    assert capsys.readouterr().out == ""


def test_convert_keeps_the_pair_and_reads_back_the_same_samples(write_data, tmp_path):
    from vlm.data.convert import convert_file
    from vlm.data.formats import read_source

    trl = write_data("trl.jsonl", [TRL_RECORDS["conversational_system_image"], TRL_TEXT_RECORDS["text"]])
    out = tmp_path / "llava_pairs.json"
    assert convert_file(trl, out)["written"] == 2
    again = list(read_source(out))
    assert [{k: v for k, v in s.items() if k != "id"} for s in again] == \
           [{k: v for k, v in s.items() if k != "id"} for s in read_source(trl)]
