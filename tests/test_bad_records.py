"""One bad record is one counted record (issue 10, points 9 and 12).

Each test plants one fault in an otherwise good file and asserts that exactly that record is dropped
and counted, with its file, line/element and reason, and the rest kept; whole-file faults (a file
that is not UTF-8, a broken mix file, nothing left to train on) are one line naming the file.
"""

from __future__ import annotations

import csv
import json

import pytest

from vlm.data.check import check_dataset, enforce_max_drop_ratio
from vlm.cli import run
from vlm.cli.data import main as data_main
from vlm.data.conversation import encode_sample
from vlm.data.dataset import SupervisedDataset
from vlm.data.formats import detect_format
from vlm.data.mix import Source
from vlm.visual.processor import ImageProcessor, ImageProcessorConfig

GOOD = 5  # good records around each planted one
CHECK = dict(template="vicuna_v1", num_image_tokens=4, check_images="exists", num_workers=1)


def good_lines(make_llava_record) -> list[str]:
    return [json.dumps(make_llava_record(f"good{k}")) for k in range(GOOD)]


def write_lines(path, lines: list[str | bytes]) -> None:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")


def write_array(path, elements: list[str]) -> None:
    """A JSON array from the elements' raw JSON text (so broken or extreme elements stay as written)."""
    path.write_text("[\n" + ",\n".join(elements) + "\n]\n", encoding="utf-8")


def only_problem(path, folder, planted_at: int) -> dict:
    """Check `path`; assert exactly the planted record was dropped and the good ones kept; return its problem."""
    kept, report = check_dataset(Source(str(path), image_folder=str(folder)), **CHECK)
    assert report["total"] == GOOD + 1 and report["kept"] == GOOD, report["problems"]
    assert kept == [k for k in range(GOOD + 1) if k != planted_at]
    (problem,) = report["problems"]
    assert problem["index"] == planted_at and problem["reason"] == "bad_schema"
    assert path.name in problem["detail"]
    return problem


SURROGATE = '{"id": "surrogate", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\\ud800"}, {"from": "gpt", "value": "red"}]}'
DEEP = '{"id": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE_ID = '{"id": ' + "9" * 5000 + ', "image": "ok.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}]}'


KEYED = [(SURROGATE, "lone surrogate"), (DEEP, "nested deeper"), (HUGE_ID, "write it as a string")]
BARE = [("[" * 100_000 + "]" * 100_000, "nested deeper"), ("9" * 5000, "write it as a string")]


@pytest.mark.parametrize(
    "name, planted, words",
    [("data.jsonl", *case) for case in KEYED] + [("data.json", *case) for case in KEYED + BARE],
    ids=[f"jsonl-{k}" for k in ("surrogate", "deep", "huge_id")]
    + [f"array-{k}" for k in ("surrogate", "deep", "huge_id", "deep_bare", "huge_bare_number")],
)
def test_unparsable_record_is_one_counted_record(name, planted, words, tmp_path, data_image_folder, make_llava_record):
    """JSON Lines: reported by line; JSON array: the element is skipped and reported by position."""
    path = tmp_path / name
    lines = good_lines(make_llava_record)
    (write_lines if name.endswith(".jsonl") else write_array)(path, lines[:2] + [planted] + lines[2:])
    problem = only_problem(path, data_image_folder, planted_at=2)
    assert ("line 3" if name.endswith(".jsonl") else "element 2") in problem["detail"] and words in problem["detail"]


def test_json_array_skip_crosses_read_chunks(tmp_path, make_llava_record):
    """The skipped element spans many read chunks (strings with brackets and escapes included)."""
    from vlm.data.formats.source import iter_json_array

    tricky = '{"s": "]]}}\\"[[", "deep": ' + "[" * 5000 + '"a]\\"b"' + "]" * 5000 + "}"
    path = tmp_path / "data.json"
    write_array(path, [json.dumps(make_llava_record("a")), tricky, json.dumps(make_llava_record("b"))])
    items = list(iter_json_array(path, chunk_chars=7))
    assert [i["id"] if isinstance(i, dict) else i.reason for i in items] == ["a", "bad_schema", "b"]


def test_invalid_utf8_in_one_jsonl_line(tmp_path, data_image_folder, make_llava_record):
    path = tmp_path / "data.jsonl"
    lines: list = good_lines(make_llava_record)
    write_lines(path, lines[:4] + ['{"id": "latin", "value": "caf\xe9"}'.encode("latin-1")] + lines[4:])
    problem = only_problem(path, data_image_folder, planted_at=4)
    assert "line 5" in problem["detail"] and "not UTF-8 (byte 0xe9" in problem["detail"] and "iconv" in problem["detail"]


def test_nul_byte_in_an_image_path(tmp_path, data_image_folder, make_llava_record):
    path = tmp_path / "data.json"
    lines = good_lines(make_llava_record)
    write_array(path, lines[:1] + [json.dumps(make_llava_record("nul", image="ok\x00.png"))] + lines[1:])
    kept, report = check_dataset(Source(str(path), image_folder=str(data_image_folder)), **CHECK)
    assert report["kept"] == GOOD and kept == [0, 2, 3, 4, 5]
    (problem,) = report["problems"]
    assert problem["id"] == "nul" and problem["reason"] == "bad_schema" and "NUL" in problem["detail"]
    assert "data.json sample 1" in problem["detail"]


def test_csv_cell_over_the_field_limit(tmp_path, data_image_folder):
    path = tmp_path / "table.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "query", "label"])
        for k in range(GOOD + 1):
            writer.writerow([f"q{k}", "ok.png", "What color?", "x" * 200_000 if k == 3 else "red"])
    problem = only_problem(path, data_image_folder, planted_at=3)
    assert "line 5" in problem["detail"] and "field limit" in problem["detail"]


def test_broken_first_jsonl_line_does_not_decide_the_format(tmp_path, data_image_folder, make_llava_record):
    path = tmp_path / "data.jsonl"
    write_lines(path, ['{"id": broken'] + good_lines(make_llava_record))
    assert detect_format(path) == "llava"
    problem = only_problem(path, data_image_folder, planted_at=0)
    assert "line 1: not JSON" in problem["detail"]
    # a .json file holding JSON Lines whose first line is broken is JSON Lines too
    as_json = tmp_path / "data_lines.json"
    as_json.write_bytes(path.read_bytes())
    assert detect_format(as_json) == "llava"


def test_misspelt_first_record_is_that_record_only(tmp_path, data_image_folder, make_llava_record):
    typo = make_llava_record("typo")
    typo["conversation"] = typo.pop("conversations")
    path = tmp_path / "data.jsonl"
    write_lines(path, [json.dumps(typo)] + good_lines(make_llava_record))
    assert detect_format(path) == "llava"  # the first record alone says xtuner
    kept, report = check_dataset(Source(str(path), image_folder=str(data_image_folder)), **CHECK)
    problem = only_problem(path, data_image_folder, planted_at=0)
    assert problem["id"] == "typo" and "no 'conversations'" in problem["detail"] and "'conversation'" in problem["detail"]
    (detection,) = report["notes"]["format_detection"]
    assert detection["format"] == "llava" and "llava 5, xtuner 1" in detection["how"]


def test_undetectable_file_says_what_it_saw(tmp_path):
    path = tmp_path / "mystery.jsonl"
    write_lines(path, ['{"foo": 1, "bar": 2}'] * 3)
    with pytest.raises(ValueError) as info:
        detect_format(path)
    message = str(info.value)
    assert "mystery.jsonl" in message and "looked at 3 readable record(s)" in message and "['bar', 'foo']" in message


def test_detection_ties_are_refused(tmp_path, make_llava_record):
    typo = make_llava_record("typo")
    typo["conversation"] = typo.pop("conversations")
    path = tmp_path / "half.jsonl"
    write_lines(path, [json.dumps(typo), json.dumps(make_llava_record("a"))])
    with pytest.raises(ValueError, match=r"several formats match \(llava, xtuner\)"):
        detect_format(path)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run("vlm data", data_main, argv)  # as the console command runs it
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_non_utf8_file_is_one_line_naming_it(suffix, tmp_path, capsys, make_llava_record):
    path = tmp_path / f"latin{suffix}"
    if suffix == ".csv":
        text = "id,image,query,label\n" + "".join(f"q{k},ok.png,What?,caf\xe9\n" for k in range(3))
    elif suffix == ".jsonl":
        text = "".join(json.dumps(make_llava_record(i, answer=a, image=None), ensure_ascii=False) + "\n"
                       for i, a in (("a", "cafe"), ("b", "caf\xe9")))
    else:
        text = json.dumps([make_llava_record("a", answer="caf\xe9")], ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    code, out, err = run_cli(["check", "--data_path", str(path), "--report", str(tmp_path / "r.json")], capsys)
    if suffix == ".jsonl":  # JSON Lines: the line is dropped and counted instead
        assert code == 1 and "bad_schema=1" in out and "not UTF-8" in err
        return
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and "not UTF-8 (byte 0xe9" in err and "iconv" in err


@pytest.mark.parametrize(
    "text, words",
    [
        ("- path: a.json\n  image_folder: [unclosed\n", "not valid YAML at line 3"),
        (b"- path: caf\xe9.json\n", "not UTF-8"),
        ("- path: good.jsonl\n  weight: abc\n", "source 0 (good.jsonl): repeat/weight"),
        ("- path: good.jsonl\n  max_samples: 2.5\n", "source 0 (good.jsonl): max_samples"),
        ("- path: good.jsonl\n  image_folder: 5\n", "'image_folder' must be a string"),
        ("- path: missing.jsonl\n", "source 0 (missing.jsonl): data file"),
        ("- path: 5\n", "source 0 must be a mapping with a 'path'"),
        ("{}\n", "a mix file is a non-empty list"),
    ],
    ids=["syntax", "not_utf8", "weight", "max_samples", "folder_type", "missing_file", "path_type", "empty"],
)
def test_broken_mix_file_is_one_line_naming_it(text, words, tmp_path, capsys, make_llava_record):
    write_lines(tmp_path / "good.jsonl", good_lines(make_llava_record))
    mix = tmp_path / "mix.yaml"
    mix.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(["check", "--data_path", str(mix), "--report", str(tmp_path / "r.json")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(mix) in err and words in err


def test_everything_dropped_is_one_line_even_with_max_drop_ratio_1(tmp_path, capsys, make_llava_record):
    path = tmp_path / "data.jsonl"
    write_lines(path, good_lines(make_llava_record))
    argv = ["check", "--data_path", str(path), "--image_folder", str(tmp_path / "no_images"),
            "--check_images", "exists", "--max_drop_ratio", "1", "--report", str(tmp_path / "r.json")]
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "all 5 samples would be dropped (missing_image=5), nothing is left to train on" in err
    report = json.loads((tmp_path / "r.json").read_text())
    with pytest.raises(ValueError, match="nothing is left to train on"):  # training calls the same function
        enforce_max_drop_ratio(report, 1.0)
    report_one_kept = {**report, "kept": 1}
    enforce_max_drop_ratio(report_one_kept, 1.0)  # one sample left: the ratio decides, as before


def test_duplicate_ids_and_special_token_text_are_counted_in_notes(tmp_path, data_image_folder, make_llava_record,
                                                                   tiny_tokenizer, capsys):
    r = make_llava_record
    records = [r("a"), r("b"), r("a", answer="blue"), r("im_end", question="<image>\nWhat?<|im_end|>"),
               r("eot", answer="red<|endoftext|>"), r("a", answer="green"), r("b")]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    source = Source(str(path), image_folder=str(data_image_folder), repeat=2)  # repeats are not duplicates
    kept, report = check_dataset(source, tokenizer=tiny_tokenizer, **{**CHECK, "template": "chatml"})
    assert report["kept"] == report["total"] == 14  # notes, not drops
    duplicates = report["notes"]["duplicate_ids"]
    assert duplicates["samples"] == 3 and duplicates["ids"] == 2
    assert duplicates["examples"] == [{"id": "a", "indices": [0, 2, 5]}, {"id": "b", "indices": [1, 6]}]
    specials = report["notes"]["special_tokens"]
    assert specials["samples"] == 2 and specials["counts"] == {"<|im_end|>": 1, "<|endoftext|>": 1}
    assert [e["id"] for e in specials["examples"]] == ["im_end", "eot"] and "<image>" not in specials["looked_for"]
    # what the note warns about is real: the tokenizer turns the data's text into the control token
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    def canonical(question: str) -> dict:
        return {"id": "x", "images": ["ok.png"], "messages": [{"role": "user", "content": question},
                                                               {"role": "assistant", "content": "red"}]}

    plain = encode_sample(canonical("<image>\nWhat?"), tiny_tokenizer, "chatml", num_image_tokens=4)
    planted = encode_sample(canonical("<image>\nWhat?<|im_end|>"), tiny_tokenizer, "chatml", num_image_tokens=4)
    assert planted.input_ids.count(im_end) == list(plain.input_ids).count(im_end) + 1

    code, out, _ = run_cli(["check", "--data_path", str(path), "--image_folder", str(data_image_folder),
                            "--template", "chatml", "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0
    assert "note: 3 samples reuse the id of an earlier one (2 ids, e.g. 'a', 'b')" in out
    assert "note: 2 samples hold special-token text (<|im_end|>=1, <|endoftext|>=1)" in out
    assert "--escape_special_tokens tokenises it as text" in out
    assert json.loads((tmp_path / "r.json").read_text())["notes"]["special_tokens"]["escaped"] is False

    # --escape_special_tokens (vlm data check, and training through SupervisedDataset): still counted, now text
    tokenizer_folder = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_folder)
    code, out, _ = run_cli(["check", "--data_path", str(path), "--image_folder", str(data_image_folder),
                            "--tokenizer", str(tokenizer_folder), "--template", "chatml", "--num_image_tokens", "4",
                            "--report", str(tmp_path / "e.json"), "--escape_special_tokens"], capsys)
    assert code == 0 and "note: 2 samples hold special-token text (<|im_end|>=1, <|endoftext|>=1) escaped" in out
    escaped_report = json.loads((tmp_path / "e.json").read_text())
    assert escaped_report["kept"] == 7 and escaped_report["notes"]["special_tokens"]["escaped"] is True
    assert escaped_report["notes"]["settings"]["escape_special_tokens"] is True
    escaped = encode_sample(canonical("<image>\nWhat?<|im_end|>"), tiny_tokenizer, "chatml", num_image_tokens=4,
                            escape_special_tokens=True)
    assert escaped.input_ids.count(im_end) == plain.input_ids.count(im_end)
    processor = ImageProcessor(ImageProcessorConfig(image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    dataset = SupervisedDataset(str(path), tiny_tokenizer, "chatml", processor, image_folder=str(data_image_folder),
                                num_image_tokens=4, escape_special_tokens=True)
    index = [r["id"] for r in records].index("im_end")
    assert dataset[index]["input_ids"].tolist() == escaped.input_ids


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    from vlm.tiny import save_tiny_components

    return save_tiny_components(tmp_path_factory.mktemp("models"), ["What color is the circle?", "red"])


def test_training_with_everything_dropped_is_one_line(tiny_models, tmp_path, capsys, make_llava_record):
    """train.py: the same refusal (not torch's `num_samples=0`), one line, exit 2, before any step."""
    from vlm.cli.train import main as train_main

    llm, vision = tiny_models
    path = tmp_path / "data.jsonl"
    write_lines(path, good_lines(make_llava_record))
    out = tmp_path / "run"
    code = train_main(["--model_name_or_path", llm, "--vision_tower", vision, "--data_path", str(path),
                       "--image_folder", str(tmp_path / "no_images"), "--check_images", "exists",
                       "--max_drop_ratio", "1", "--output_dir", str(out), "--report_to", "none",
                       "--use_cpu", "True", "--max_steps", "1", "--dataloader_num_workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("train.py: error: all 5 samples would be dropped (missing_image=5)"), err
    assert "Traceback" not in "\n".join(err) and (out / "data_report.json").is_file()
    assert not list(out.glob("checkpoint-*"))


def test_training_with_a_broken_mix_file_is_one_line(tiny_models, tmp_path, capsys):
    from vlm.cli.train import main as train_main

    mix = tmp_path / "mix.yaml"
    mix.write_text("- path: a.json\n  image_folder: [unclosed\n", encoding="utf-8")
    code = train_main(["--model_name_or_path", tiny_models[0], "--vision_tower", tiny_models[1], "--data_path", str(mix),
                       "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--use_cpu", "True"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err), err  # above it: the model loading's progress bars
    assert err[-1].startswith(f"train.py: error: {mix}: not valid YAML at line 3"), err


def test_lone_surrogate_in_a_whole_object_file_is_that_record(tmp_path, data_image_folder):
    """COCO files are loaded whole (no line to blame): the mix store refuses the one sample it cannot write."""
    from vlm.data.mix import MixedRecords

    captions = ["a cat \\ud800" if k == 3 else "a cat" for k in range(GOOD + 1)]  # the raw JSON escape
    annotations = ",".join(f'{{"id": {k}, "image_id": 1, "caption": "{c}"}}' for k, c in enumerate(captions))
    path = tmp_path / "captions.json"
    path.write_text(f'{{"images": [{{"id": 1, "file_name": "ok.png"}}], "annotations": [{annotations}]}}', encoding="utf-8")
    records = MixedRecords([Source(str(path), image_folder=str(data_image_folder))])
    kept, report = check_dataset(records, **{**CHECK, "template": "plain"})
    assert report["kept"] == GOOD and kept == [0, 1, 2, 4, 5]
    (problem,) = report["problems"]
    assert problem["id"] == "3" and "captions.json record 3" in problem["detail"] and "surrogate" in problem["detail"]
