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
