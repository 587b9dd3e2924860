"""Validation: every drop reason produced by a fixture, the report's shape, image-check modes, the drop-ratio stop."""

from __future__ import annotations

import os

import pytest

from vlm.data.check import check_dataset, enforce_max_drop_ratio
from vlm.data.errors import REASONS, SampleError
from vlm.data.mix import Source
from vlm.data.paths import ImageFolder, resolve_image_path
from vlm.data.sample import validate_sample
from vlm.visual.processor import ImageProcessor, ImageProcessorConfig

CHECK = dict(template="vicuna_v1", num_image_tokens=4, max_length=80)


@pytest.fixture
def every_reason(tmp_path, data_image_folder, write_data, make_llava_record):
    """A LLaVA file with one record per drop reason (plus kept ones), and its image folder.

    Returns (path, folder, expected {id: reason or None for kept}).
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes((data_image_folder / "ok.png").read_bytes())
    os.symlink(outside / "secret.png", data_image_folder / "link_out.png")
    os.symlink(outside, data_image_folder / "dir_out")
    os.symlink(data_image_folder / "ok.png", data_image_folder / "link_in.png")
    r = make_llava_record
    cases = [
        (r("ok"), None),
        (r("prepended", question="What color is the circle?", image="sub/ok2.png"), None),
        (r("text_only", question="Is there a blue triangle?", answer="no", image=None), None),
        (r("symlink_inside", image="link_in.png"), None),
        ({"id": "bad_schema", "conversations": [{"from": "human", "value": ["not", "text"]}]}, "bad_schema"),
        ({"id": "bad_roles", "image": "ok.png", "conversations": [
            {"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>\nWhat?"}]}, "bad_roles"),
        (r("empty_turn", answer="   "), "empty_turn"),
        (r("missing", image="nowhere.png"), "missing_image"),
        (r("corrupt", image="corrupt.png"), "unreadable_image"),
        (r("truncated", image="truncated.png"), "unreadable_image"),
        (r("dotdot", image="../outside/secret.png"), "unsafe_path"),
        (r("absolute", image=str(outside / "secret.png")), "unsafe_path"),
        (r("symlink_out", image="link_out.png"), "unsafe_path"),
        (r("symlink_dir_out", image="dir_out/secret.png"), "unsafe_path"),
        (r("two_placeholders", question="<image> and <image>: same?"), "placeholder_mismatch"),
        (r("too_long", answer="A red circle next to a green square on a white background. " * 6), "too_long"),
        ({"id": "unanswered", "conversations": [{"from": "human", "value": "Anyone there?"}]}, "no_supervised_tokens"),
    ]
    records = [record for record, _ in cases]
    expected = {record["id"]: reason for record, reason in cases}
    return write_data("every_reason.json", records), data_image_folder, expected


def test_every_reason_is_reported_with_the_contract_report(every_reason, tiny_tokenizer):
    path, folder, expected = every_reason
    kept, report = check_dataset(Source(str(path), str(folder)), tokenizer=tiny_tokenizer, **CHECK)
    assert set(report) == {"total", "kept", "dropped", "problems", "notes"}
    assert report["total"] == len(expected) and report["kept"] == len(kept) == 4
    assert kept == [0, 1, 2, 3]
    got = {p["id"]: p["reason"] for p in report["problems"]}
    assert got == {k: v for k, v in expected.items() if v is not None}
    # every reason produced (template_mismatch needs a tokenizer template: tests/test_instruct_templates.py)
    assert set(report["dropped"]) == set(REASONS) - {"template_mismatch", "empty_answer", "same_answers"}  # pairs: test_preference_data
    assert report["dropped"]["unsafe_path"] == 4 and report["dropped"]["unreadable_image"] == 2
    assert list(report["dropped"]) == [r for r in REASONS if r in report["dropped"]]
    for problem in report["problems"]:
        assert list(problem) == ["index", "id", "reason", "detail"]
        assert problem["detail"]
    by_id = {p["id"]: p for p in report["problems"]}
    assert by_id["too_long"]["index"] == 15 and "max_length 80" in by_id["too_long"]["detail"]
    assert "every_reason.json" in by_id["missing"]["detail"]  # names the file
    assert report["notes"]["image_prepended"] == 1
    assert report["notes"]["sources"][0]["format"] == "llava"
    assert report["notes"]["skipped"] == []


def test_parallel_check_gives_the_serial_report(every_reason, tiny_tokenizer):
    path, folder, _ = every_reason
    source = Source(str(path), str(folder), repeat=2)
    serial = check_dataset(source, tokenizer=tiny_tokenizer, num_workers=1, **CHECK)
    assert check_dataset(source, tokenizer=tiny_tokenizer, num_workers=2, **CHECK) == serial
    assert serial[1]["total"] == 34 and len(serial[1]["problems"]) == 26


def test_check_images_modes(every_reason, tiny_tokenizer):
    path, folder, _ = every_reason
    source = Source(str(path), str(folder))
    _, exists = check_dataset(source, tokenizer=tiny_tokenizer, check_images="exists", **CHECK)
    assert "unreadable_image" not in exists["dropped"]
    assert exists["dropped"]["missing_image"] == 1 and exists["dropped"]["unsafe_path"] == 4
    _, none = check_dataset(source, tokenizer=tiny_tokenizer, check_images="none", **CHECK)
    assert "missing_image" not in none["dropped"]
    assert none["dropped"]["unsafe_path"] == 2  # `..` and absolute are refused from the string alone
    assert any("missing_image" in note for note in none["notes"]["skipped"])
    with pytest.raises(ValueError, match="check_images"):
        check_dataset(source, tokenizer=tiny_tokenizer, check_images="quick", **CHECK)


def test_without_tokenizer_lengths_are_skipped_but_other_checks_run(every_reason):
    path, folder, expected = every_reason
    kept, report = check_dataset(Source(str(path), str(folder)), tokenizer=None, **CHECK)
    assert "too_long" not in report["dropped"]
    assert report["dropped"]["placeholder_mismatch"] == 1
    assert any(note.startswith("too_long") for note in report["notes"]["skipped"])
    assert report["kept"] == 5  # the too-long sample is kept: lengths unknown


def test_plain_samples_and_repeats_are_checked_once_but_reported_per_index(tmp_path, data_image_folder, write_data,
                                                                          make_llava_record, tiny_tokenizer):
    samples = [{"id": "s", "images": ["ok.png"], "messages": [{"role": "user", "content": "<image>\nWhat color?"},
                                                             {"role": "assistant", "content": "red"}]},
               SampleError("bad_schema", "from a reader", sample_id="r")]
    kept, report = check_dataset(samples, image_folder=str(data_image_folder), tokenizer=tiny_tokenizer, **CHECK)
    assert kept == [0] and report["problems"] == [{"index": 1, "id": "r", "reason": "bad_schema", "detail": "from a reader"}]
    path = write_data("rep.json", [make_llava_record("a"), make_llava_record("b", image="gone.png")])
    kept, report = check_dataset(Source(str(path), str(data_image_folder), repeat=2), tokenizer=tiny_tokenizer, **CHECK)
    assert report["total"] == 4 and kept == [0, 2]
    assert [p["index"] for p in report["problems"]] == [1, 3]


def test_enforce_max_drop_ratio(every_reason, tiny_tokenizer):
    path, folder, _ = every_reason
    _, report = check_dataset(Source(str(path), str(folder)), tokenizer=tiny_tokenizer, **CHECK)
    with pytest.raises(ValueError) as info:
        enforce_max_drop_ratio(report, 0.01, report_path="out/report.json")
    message = str(info.value)
    assert "13 of 17 samples (76.5%)" in message and "--max_drop_ratio 0.01" in message
    assert "unsafe_path=4" in message and "bad_schema=1" in message
    assert "[4] 'bad_schema'" in message and "out/report.json" in message
    assert "is --image_folder the folder" in message and "raise --model_max_length" in message
    enforce_max_drop_ratio(report, 0.8)  # under the ratio: no error
    with pytest.raises(ValueError, match="no samples"):
        enforce_max_drop_ratio({"total": 0, "kept": 0, "dropped": {}, "problems": []})


# ---------------------------------------------------------------- paths and sample validation


def test_image_paths_inside_outside_and_symlinked_folder(tmp_path, data_image_folder):
    assert resolve_image_path("sub/../ok.png", data_image_folder) == data_image_folder / "ok.png"
    linked = tmp_path / "linked_images"
    os.symlink(data_image_folder, linked)  # the folder itself may be a symlink
    assert resolve_image_path("sub/ok2.png", linked) == linked / "sub" / "ok2.png"
    assert resolve_image_path("../images/ok.png", data_image_folder) == data_image_folder / "ok.png"  # back inside
    for image, reason in [("../linked_images/ok.png", "unsafe_path"), ("/etc/passwd", "unsafe_path"),
                          ("sub", "missing_image"), ("no.png", "missing_image")]:
        with pytest.raises(SampleError) as info:
            resolve_image_path(image, data_image_folder)
        assert info.value.reason == reason, image
    with pytest.raises(SampleError, match="no --image_folder"):
        ImageFolder(None).resolve("ok.png")
    with pytest.raises(SampleError) as info:
        ImageFolder(data_image_folder).check("truncated.png", "full")
    assert info.value.reason == "unreadable_image" and "truncated.png" in info.value.detail
    ImageFolder(data_image_folder).check("truncated.png", "exists")


@pytest.mark.parametrize(
    "sample, reason",
    [
        ("not a dict", "bad_schema"),
        ({"id": "x", "images": [], "messages": []}, "bad_schema"),
        ({"id": "x", "images": "a.png", "messages": [{"role": "user", "content": "q"}]}, "bad_schema"),
        ({"id": "x", "images": [], "messages": [{"role": "user", "content": "q"}], "extra": 1}, "bad_schema"),
        ({"id": "x", "images": [], "messages": [{"role": "human", "content": "q"}]}, "bad_roles"),
        ({"id": "x", "images": [], "messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                                {"role": "assistant", "content": "a"}]}, "bad_roles"),
        ({"id": "x", "images": [], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                                {"role": "user", "content": "q2"}]}, "bad_roles"),
        ({"id": "x", "images": [], "messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]}, "bad_roles"),
        ({"id": "x", "images": [], "messages": [{"role": "user", "content": " \n"},
                                                {"role": "assistant", "content": "a"}]}, "empty_turn"),
        ({"id": "x", "images": [], "messages": [{"role": "system", "content": "s"}]}, "no_supervised_tokens"),
    ],
)
def test_validate_sample_reasons(sample, reason):
    with pytest.raises(SampleError) as info:
        validate_sample(sample, index=3)
    assert info.value.reason == reason and info.value.index == 3


def test_validate_sample_accepts_system_first_and_meta():
    sample = {"id": "x", "images": ["a.png"], "meta": {"source": "NWPU"},
              "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>"},
                           {"role": "assistant", "content": "a"}]}
    assert validate_sample(sample) is sample


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": text} for role, text in pairs]


# (id, record fields, the reason): one validator, so `vlm data check` and the training dataset must agree
SAME_REASON_TABLE = [
    ("user_user", {"conversations": _turns(("human", "<image>\nWhat?"), ("human", "Which?"))}, "bad_roles"),
    ("user_user_assistant", {"conversations": _turns(("human", "<image>\nWhat?"), ("human", "Which?"),
                                                     ("gpt", "red"))}, "bad_roles"),
    ("assistant_first", {"conversations": _turns(("gpt", "red"), ("human", "<image>\nWhat?"))}, "bad_roles"),
    ("system_not_first", {"conversations": _turns(("human", "<image>\nWhat?"), ("system", "Be brief."),
                                                  ("gpt", "red"))}, "bad_roles"),
    ("unknown_role", {"conversations": _turns(("human", "<image>\nWhat?"), ("bot", "red"))}, "bad_roles"),
    ("unanswered", {"conversations": _turns(("human", "<image>\nWhat?"), ("gpt", "red"), ("human", "And?"))},
     "bad_roles"),
    ("question_only", {"conversations": _turns(("human", "<image>\nWhat?"))}, "no_supervised_tokens"),
    ("empty_turn", {"conversations": _turns(("human", "<image>\nWhat?"), ("gpt", " \n"))}, "empty_turn"),
    ("empty_and_bad_roles", {"conversations": _turns(("human", ""), ("human", "x"))}, "bad_roles"),
    ("placeholders", {"conversations": _turns(("human", "<image> and <image>"), ("gpt", "red"))},
     "placeholder_mismatch"),
    ("image_in_reply", {"image": ["ok.png", "sub/ok2.png"],
                        "conversations": _turns(("human", "<image>\nWhat?"), ("gpt", "see <image>"))},
     "placeholder_mismatch"),
    ("missing_and_placeholders", {"image": "nowhere.png",
                                  "conversations": _turns(("human", "<image><image>"), ("gpt", "red"))},
     "missing_image"),
    ("unreadable_and_placeholders", {"image": "corrupt.png",
                                     "conversations": _turns(("human", "<image><image>"), ("gpt", "red"))},
     "unreadable_image"),
    ("escape", {"image": "../ok.png", "conversations": _turns(("human", "<image>\nWhat?"), ("gpt", "red"))},
     "unsafe_path"),
    ("too_long", {"conversations": _turns(("human", "<image>\nWhat?"), ("gpt", "red " * 200))}, "too_long"),
    ("kept", {"conversations": _turns(("human", "<image>\nWhat?"), ("gpt", "red"))}, None),
]


def test_check_and_training_give_the_same_reason(tmp_path, data_image_folder, write_data, tiny_tokenizer):
    """Issue 9: a bad sample's reason is the same through `vlm data check` (the report) and through the training
    dataset's validation (`SupervisedDataset[i]` raising a SampleError), since both run `check_sample`."""
    import json

    from vlm.cli import main as vlm_main
    from vlm.data.dataset import SupervisedDataset

    records = [{"id": sample_id, "image": "ok.png", **fields} for sample_id, fields, _ in SAME_REASON_TABLE]
    data = write_data("table.json", records)
    tokenizer_folder = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_folder)
    report_path = tmp_path / "report.json"
    code = vlm_main(["data", "check", "--data_path", str(data), "--image_folder", str(data_image_folder),
                     "--tokenizer", str(tokenizer_folder), "--template", "vicuna_v1", "--num_image_tokens", "4",
                     "--model_max_length", "120", "--report", str(report_path), "--max_drop_ratio", "1"])
    assert code == 0
    report = json.loads(report_path.read_text())
    by_check = {p["id"]: p["reason"] for p in report["problems"]}

    dataset = SupervisedDataset(str(data), tiny_tokenizer, "vicuna_v1", ImageProcessor(ImageProcessorConfig(
        image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)), image_folder=str(data_image_folder),
        num_image_tokens=4, max_length=120)
    by_training = {}
    for index in range(len(dataset)):
        try:
            dataset[index]
        except SampleError as e:
            by_training[e.sample_id] = e.reason
    expected = {sample_id: reason for sample_id, _, reason in SAME_REASON_TABLE if reason}
    assert by_check == expected
    assert by_training == expected
    assert report["kept"] == 1
