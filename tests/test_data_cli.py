"""`vlm data check|convert|filter` end to end, in-process through `vlm.cli.run` and `vlm.cli.data.main`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlm.cli import run
from vlm.cli.data import main as data_main
from vlm.data.formats import read_source

RS_SUBSETS = ("NWPU", "RSICD", "UAV", "UCM", "LR", "DOTA")


def main(argv: list[str]) -> int:
    """`vlm data ...` as the console command runs it: under `vlm.cli.run` (a user mistake: one line, exit 2)."""
    return run("vlm data", data_main, argv)


def load(path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- check


def test_check_writes_the_report_and_stops_over_the_drop_ratio(tmp_path, write_data, data_image_folder,
                                                               make_llava_record, capsys):
    data = write_data("d.json", [make_llava_record(f"ok{k}") for k in range(9)] + [make_llava_record("gone", image="x.png")])
    report_path = tmp_path / "out" / "report.json"
    argv = ["check", "--data_path", str(data), "--image_folder", str(data_image_folder), "--report", str(report_path),
            "--num_image_tokens", "4", "--check_images", "exists"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "dropped missing_image=1" in captured.out and "1 of 10 samples (10.0%)" in captured.err
    assert str(report_path) in captured.err
    report = load(report_path)
    assert (report["total"], report["kept"], report["dropped"]) == (10, 9, {"missing_image": 1})
    assert report["problems"][0]["index"] == 9 and report["problems"][0]["id"] == "gone"
    assert main(argv + ["--max_drop_ratio", "0.2"]) == 0


def test_check_with_a_saved_tokenizer_checks_lengths(tmp_path, write_data, data_image_folder, make_llava_record,
                                                     tiny_tokenizer, capsys):
    tokenizer_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    data = write_data("d.jsonl", [make_llava_record("short"), make_llava_record("long", answer="red circle " * 60)])
    report_path = tmp_path / "r.json"
    code = main(["check", "--data_path", str(data), "--image_folder", str(data_image_folder), "--report", str(report_path),
                 "--tokenizer", str(tokenizer_dir), "--version", "v1", "--num_image_tokens", "4",
                 "--model_max_length", "96", "--max_drop_ratio", "0.5"])
    assert code == 0
    report = load(report_path)
    assert report["dropped"] == {"too_long": 1} and report["notes"]["settings"]["template"] == "v1"
    assert report["notes"]["skipped"] == []


def test_check_mix_of_two_sources_with_weights(tmp_path, write_data, data_image_folder, make_llava_record):
    a = write_data("a.json", [make_llava_record("a0"), make_llava_record("a1")])
    b = write_data("b.json", [make_llava_record("b0", image="ok2.png")])
    report_path = tmp_path / "r.json"
    argv = ["check", "--data_path", f"{a},{b}", "--image_folder", f"{data_image_folder},{data_image_folder / 'sub'}",
            "--data_weights", "1,3", "--report", str(report_path), "--num_image_tokens", "4"]
    assert main(argv) == 0
    report = load(report_path)
    assert report["total"] == 5 and report["kept"] == 5
    assert [s["in_mix"] for s in report["notes"]["sources"]] == [2, 3]


def test_synth_then_check_with_decoded_images(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["synth", "--out", str(out), "--n_train", "6", "--n_eval", "2"]) == 0
    report_path = tmp_path / "r.json"
    assert main(["check", "--data_path", str(out / "train.json"), "--image_folder", str(out / "images"),
                 "--report", str(report_path), "--template", "chatml", "--num_image_tokens", "16"]) == 0
    report = load(report_path)
    assert report["total"] == report["kept"] > 0 and report["notes"]["settings"]["check_images"] == "full"
    assert main(["check", "--data_path", str(out / "train.json"), "--image_folder", str(out),
                 "--report", str(report_path)]) == 1
    assert "is --image_folder the folder" in capsys.readouterr().err


def test_check_bad_arguments_exit_2(write_data, make_llava_record, capsys):
    data = write_data("d.json", [make_llava_record("a")])
    assert main(["check", "--data_path", f"{data},{data}", "--image_folder", "a,b,c"]) == 2
    assert "--image_folder has 3 values" in capsys.readouterr().err
    assert main(["check", "--data_path", str(data), "--prompt", "hello"]) == 2


# ---------------------------------------------------------------- convert


def test_convert_llava_round_trip(tmp_path, write_data, make_llava_record):
    records = [
        make_llava_record("a", source="coco"),
        make_llava_record("b", image=["x.png", "y.png"], question="<image><image>\nDiff?"),
        make_llava_record("c", image=None),
        {"id": "d", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}]},
    ]
    original = write_data("in.json", records)
    once, twice = tmp_path / "once.json", tmp_path / "twice.json"
    assert main(["convert", "--input", str(original), "--output", str(once)]) == 0
    assert load(once) == records
    assert main(["convert", "--input", str(once), "--output", str(twice)]) == 0
    assert twice.read_bytes() == once.read_bytes()


def test_convert_caption_sets_to_llava_and_reports_skipped(tmp_path, write_data, capsys):
    aic = write_data("aic.json", [{"image_id": "a.jpg", "caption": ["一只猫", "猫"]}, {"image_id": 5, "caption": ["x"]}])
    out = tmp_path / "aic_llava.json"
    assert main(["convert", "--input", str(aic), "--output", str(out), "--caption_mode", "sample", "--seed", "1"]) == 0
    assert "wrote 1 samples (ai_challenger -> LLaVA JSON)" in capsys.readouterr().out  # and says what it skipped
    (record,) = load(out)
    assert record["image"] == "a.jpg" and record["conversations"][0] == {"from": "human", "value": "<image>\n请描述这张图片。"}
    assert "请描述这张图片" in out.read_text(encoding="utf-8")  # written unescaped
    assert list(read_source(out)) == list(read_source(aic, caption_mode="sample", seed=1))[:1]
    csv = write_data("qa.csv", "image,query,label\nc.png,Max?,3\n")
    assert main(["convert", "--input", str(csv), "--format", "qa_table", "--output", str(tmp_path / "qa.json")]) == 0
    assert load(tmp_path / "qa.json")[0]["conversations"][1] == {"from": "gpt", "value": "3"}
    empty = write_data("empty.json", [{"image_id": 5, "caption": "x"}])
    assert main(["convert", "--input", str(empty), "--output", str(tmp_path / "none.json")]) == 1


# ---------------------------------------------------------------- filter


@pytest.fixture
def remote_sensing(tmp_path, write_data, make_llava_record):
    """An instruction set with six subsets; images on disk for all but one RSICD image and the DOTA folder."""
    folder = tmp_path / "rs_images"
    records = []
    for subset in RS_SUBSETS:
        for k in range(2):
            image = f"{subset}/{subset.lower()}_{k}.png"
            records.append(make_llava_record(f"{subset}-{k}", image=image, source=subset.lower()))
            if subset != "DOTA" and (subset, k) != ("RSICD", 1):
                (folder / subset).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(folder / image)
    return write_data("rs_instruct.json", records), folder


def test_filter_keeps_subsets_and_reports_missing_images_per_subset(tmp_path, remote_sensing, capsys):
    data, folder = remote_sensing
    out, report_path = tmp_path / "rs_4.json", tmp_path / "rs_4_report.json"
    code = main(["filter", "--data_path", str(data), "--image_folder", str(folder), "--keep-prefix", "NWPU,RSICD,LR,DOTA",
                 "--output", str(out), "--report", str(report_path)])
    assert code == 1  # kept images are missing
    kept = load(out)
    assert sorted({r["id"].split("-")[0] for r in kept}) == ["DOTA", "LR", "NWPU", "RSICD"] and len(kept) == 8
    report = load(report_path)
    subsets = report["subsets"]
    assert subsets["RSICD"]["missing_images"] == 1 and subsets["NWPU"]["missing_images"] == 0
    assert subsets["DOTA"]["missing_images"] == 2 and subsets["DOTA"]["folders"] == {"DOTA": False}
    assert subsets["UAV"] == {"kept": False, "samples": 2, "images": 0, "missing_images": 0}
    assert report["missing"]["RSICD"] == ["RSICD/rsicd_1.png (missing_image)"]
    printed = capsys.readouterr().out
    assert "DOTA/ (MISSING)" in printed and "kept 8 of 12 readable samples" in printed


def test_filter_by_dropped_prefix_and_by_field(tmp_path, remote_sensing):
    data, folder = remote_sensing
    dropped = tmp_path / "no_uav.json"
    assert main(["filter", "--data_path", str(data), "--image_folder", str(folder), "--drop-prefix", "UAV,UCM,DOTA",
                 "--output", str(dropped)]) == 1  # RSICD still misses one image
    assert sorted({r["source"] for r in load(dropped)}) == ["lr", "nwpu", "rsicd"]
    by_field = tmp_path / "by_field.json"
    assert main(["filter", "--data_path", str(data), "--image_folder", str(folder), "--field", "source",
                 "--keep-values", "nwpu,ucm", "--output", str(by_field)]) == 0
    assert [r["id"] for r in load(by_field)] == ["NWPU-0", "NWPU-1", "UCM-0", "UCM-1"]
    assert main(["filter", "--data_path", str(data), "--output", str(by_field)]) == 2  # nothing to filter by


def test_user_mistakes_are_one_line_exit_2_through_the_runner(tmp_path, write_data, make_llava_record, capsys,
                                                              monkeypatch):
    """vlm.errors policy: `main` raises the vlm.errors class (no catch-and-print of its own); the runner that
    `vlm data` goes through prints `vlm data: error: ...` in one line and exits 2."""
    monkeypatch.chdir(tmp_path)  # a check that runs writes its default report.json into the current folder
    from vlm.data.errors import DataError
    from vlm.errors import ConfigError, MissingPathError

    data = write_data("d.json", [make_llava_record("a")])
    cases = [
        (["check", "--data_path", str(tmp_path / "missing.json")], (DataError, MissingPathError), "missing.json"),
        (["check", "--data_path", str(data), "--template", "alpaca"], ConfigError, "unknown chat template 'alpaca'"),
        (["check", "--data_path", str(data), "--max_drop_ratio", "2"], ConfigError, "--max_drop_ratio must be in"),
        (["check", "--data_path", str(data), "--num_image_tokens", "0"], ConfigError, "num_image_tokens must be"),
        (["filter", "--data_path", str(data), "--output", str(tmp_path / "o.json")], ConfigError, "nothing to filter"),
    ]
    for argv, error, words in cases:
        with pytest.raises(error, match=words):
            data_main(argv)
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vlm data: error: ") and words.split("'")[0] in err[0], err
