"""Faults planted in data read at run time (issue 10, points 5, 8, 13, 14): `vlm generate`'s bad lines and
image paths, corrupt images met during training, absolute image paths."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from inference_helpers import save_tiny_folder, write_image
from vlm.generate.batch import BadLine, answer_file, read_questions
from vlm.cli.generate import main as batch_main
from vlm.data.errors import SampleError
from vlm.data.paths import ImageFolder
from vlm.generate.decoding import GenerationSettings
from vlm.generate.generator import load_generator


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("model"), "clip", "qwen2", template="chatml", seed=1)


@pytest.fixture(scope="module")
def generator(model_dir):
    return load_generator(str(model_dir), settings=GenerationSettings(max_new_tokens=6))


# -- point 5 + 8: vlm generate answers every good line, reports every bad one, stays in --image_folder ------


def _questions_with_faults(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """12 lines: line 2 is not JSON, line 5 escapes the folder with '..', line 7 is an absolute path outside it,
    line 11 is an image that cannot be decoded; the 8 others are good."""
    images = tmp_path / "img"
    images.mkdir()
    write_image(images / "red.png")
    write_image(images / "blue.png", (40, 80, 220), (30, 50))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    secret = write_image(tmp_path / "secret.png")  # beside the folder, not in it
    lines: list[str] = []
    good: list[dict] = []
    for number in range(1, 13):
        record = {"id": f"q{number}", "image": "red.png" if number % 2 else "blue.png",
                  "question": "What color is the circle?" if number % 3 else "How many shapes are there?"}
        if number == 2:
            lines.append('{"id": "q2", "image": "red.png", "question": "cut off')
            continue
        if number == 5:
            record["image"] = "../secret.png"
        elif number == 7:
            record["image"] = str(secret)
        elif number == 11:
            record["image"] = "broken.png"
        elif number == 9:
            record["image"] = str(images / "blue.png")  # absolute, but inside the folder: allowed
        else:
            good.append(record)
        if number == 9:
            good.append(record)
        lines.append(json.dumps(record))
    good.sort(key=lambda r: int(r["id"][1:]))
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return questions, images, good


def test_generate_answers_the_good_lines_and_reports_every_bad_one(model_dir, generator, tmp_path, capsys):
    questions, images, good = _questions_with_faults(tmp_path)
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(model_dir), "--input", str(questions), "--output", str(out), "--image_folder", str(images),
            "--batch_size", "3", "--max_new_tokens", "6", "--no-progress"]
    assert batch_main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("vlm generate: skipped ")]
    assert len(skipped) == 4  # planted 4 bad lines, 4 reported
    assert f"{questions} line 2: bad_json: not valid JSON" in skipped[0]
    assert f"{questions} line 5 (id 'q5'): unsafe_path: image path '../secret.png' leaves --image_folder" in skipped[1]
    assert f"{questions} line 7 (id 'q7'): unsafe_path:" in skipped[2] and "outside --image_folder" in skipped[2]
    assert f"{questions} line 11 (id 'q11'): unreadable_image:" in skipped[3] and "broken.png" in skipped[3]
    assert err[-1].startswith(f"vlm generate: 8 answers written to {out}; 4 bad line(s) skipped (")
    assert "lines 2, 5, 7, 11" in err[-1] and "unsafe_path=2" in err[-1]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in written] == [r["id"] for r in good]  # input order, the 8 good ones
    for w, r in zip(written, good):
        image = r["image"] if r["image"].startswith("/") else str(images / r["image"])
        assert w["answer"] == generator.answer(r["question"], image)


def test_generate_without_image_folder_keeps_relative_to_the_input(model_dir, tmp_path, capsys):
    questions, images, _ = _questions_with_faults(tmp_path)
    parsed = read_questions(str(questions))  # no --image_folder: relative to the input's folder, absolute as given
    assert {r["_line"]: r["_image_path"] for r in parsed.records}[7] == str(tmp_path / "secret.png")
    assert {b.line: b.reason for b in parsed.bad}[5] == "missing_image"  # tmp_path/../secret.png: none there
    parsed = read_questions(str(questions), str(images))
    assert [(b.line, b.reason) for b in parsed.bad] == [(2, "bad_json"), (5, "unsafe_path"), (7, "unsafe_path")]


def test_generate_writes_each_batch_as_it_is_answered(tmp_path):
    """A crash in batch 3 keeps batches 1 and 2 on disk: the file is written and flushed per batch."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": str(i), "question": f"q{i}"}) + "\n" for i in range(7)))
    parsed = read_questions(str(questions))
    out_path = tmp_path / "a.jsonl"

    class Crashes:
        calls = 0

        def answer_batch(self, qs, images, batch_size):
            self.calls += 1
            if self.calls == 3:
                assert [json.loads(line)["id"] for line in out_path.read_text().splitlines()] == list("0123")
                raise MemoryError("planted")
            return [q.upper() for q in qs]

    with open(out_path, "w", encoding="utf-8") as out, pytest.raises(MemoryError):
        answer_file(Crashes(), parsed, parsed.records, out, model="m", batch_size=2)
    assert [json.loads(line)["answer"] for line in out_path.read_text().splitlines()] == ["Q0", "Q1", "Q2", "Q3"]


def test_a_question_the_model_cannot_take_is_one_bad_line(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": str(i), "question": "long " * 50 if i == 1 else f"q{i}"}) + "\n"
                                 for i in range(3)))
    parsed = read_questions(str(questions))

    class TooLong:
        def answer_batch(self, qs, images, batch_size):
            if any(len(q) > 100 for q in qs):
                raise ValueError("the prompt is 300 tokens, which leaves no room to answer")
            return [q.upper() for q in qs]

    out = io.StringIO()
    bad = answer_file(TooLong(), parsed, parsed.records, out, model="m", batch_size=8)
    assert bad == [BadLine(2, "1", "bad_question", "the prompt is 300 tokens, which leaves no room to answer")]
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ["0", "2"]


# -- point 14: absolute image paths refused naming the opt-in, accepted with it ---------------------------


def test_absolute_paths_are_refused_naming_the_flag_and_accepted_with_it(data_image_folder, tmp_path):
    absolute = str(data_image_folder / "ok.png")
    with pytest.raises(SampleError, match="--allow_absolute_image_paths") as refused:
        ImageFolder(data_image_folder).resolve(absolute)
    assert refused.value.reason == "unsafe_path"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_image(elsewhere / "x.png")
    folder = ImageFolder(data_image_folder, allow_absolute=True)
    assert folder.resolve(str(elsewhere / "x.png")) == elsewhere / "x.png"
    assert folder.resolve(absolute) == data_image_folder / "ok.png"
    assert ImageFolder(None, allow_absolute=True).resolve(str(elsewhere / "x.png")) == elsewhere / "x.png"
    # the same checks as relative paths: missing, not a regular file, and `..` inside the folder still refused
    with pytest.raises(SampleError, match="not found") as missing:
        folder.resolve(str(elsewhere / "gone.png"))
    assert missing.value.reason == "missing_image"
    with pytest.raises(SampleError, match="not a regular file"):
        folder.resolve(str(elsewhere))
    with pytest.raises(SampleError, match="not a regular file"):
        folder.resolve("/dev/null")
    with pytest.raises(SampleError, match="leaves --image_folder"):
        folder.resolve("../elsewhere/x.png")
    # a symlink under the image folder pointing out of it is refused even with the opt-in
    (data_image_folder / "link.png").symlink_to(elsewhere / "x.png")
    with pytest.raises(SampleError, match="symlink"):
        folder.resolve(str(data_image_folder / "link.png"))
    with pytest.raises(SampleError, match="unreadable|cannot"):
        folder.check(str(data_image_folder / "corrupt.png"), "full")


def test_data_check_allow_absolute_image_paths(data_image_folder, write_data, make_llava_record, tmp_path, capsys):
    from vlm.cli.data import main as data_main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_image(elsewhere / "x.png")
    data = write_data("abs.json", [make_llava_record("rel"), make_llava_record("abs", image=str(elsewhere / "x.png"))])
    report = tmp_path / "report.json"
    argv = ["check", "--data_path", str(data), "--image_folder", str(data_image_folder), "--report", str(report),
            "--max_drop_ratio", "0"]
    assert data_main(argv) == 1
    problems = json.loads(report.read_text())["problems"]
    assert [(p["id"], p["reason"]) for p in problems] == [("abs", "unsafe_path")]
    assert "--allow_absolute_image_paths" in problems[0]["detail"]
    capsys.readouterr()
    assert data_main([*argv, "--allow_absolute_image_paths"]) == 0
    assert json.loads(report.read_text())["kept"] == 2


# -- point 13: an image that turns out unreadable in training is counted, replaced, reported; too many stop ---


def test_dataset_replaces_an_unreadable_sample_by_the_next_usable_one(data_image_folder, write_data,
                                                                       make_llava_record, tiny_tokenizer):
    import pickle

    import torch

    from vlm.data.collate import DataCollator
    from vlm.data.dataset import DATA_DROPS_KEY, SupervisedDataset
    from vlm.visual.processor import ImageProcessor, ImageProcessorConfig

    r = make_llava_record
    data = write_data("d.json", [r("one"), r("broken", image="corrupt.png"), r("cut", image="truncated.png"),
                                 r("two", image="sub/ok2.png")])
    processor = ImageProcessor(ImageProcessorConfig(image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    make = lambda mode: SupervisedDataset(str(data), tiny_tokenizer, "vicuna_v1", processor,  # noqa: E731
                                          image_folder=str(data_image_folder), num_image_tokens=4, on_bad_image=mode)
    with pytest.raises(SampleError, match="broken"):
        make("raise")[1]
    dataset = make("replace")
    item = dataset[1]
    assert [(d["index"], d["id"], d["reason"]) for d in item[DATA_DROPS_KEY]] == [
        (1, "broken", "unreadable_image"), (2, "cut", "unreadable_image")]
    assert "corrupt.png" in item[DATA_DROPS_KEY][0]["detail"]
    assert torch.equal(item["pixel_values"], dataset[3]["pixel_values"])  # the next usable sample, 'two'
    assert torch.equal(item["input_ids"], dataset[3]["input_ids"]) and DATA_DROPS_KEY not in dataset[3]
    again = pickle.loads(pickle.dumps(make("replace")))[2]  # a fresh worker: same stand-in, drop named again
    assert torch.equal(again["input_ids"], item["input_ids"]) and again[DATA_DROPS_KEY][0]["id"] == "cut"
    batch = DataCollator(pad_token_id=0)([dataset[0], make("replace")[1]])
    assert [d["id"] for d in batch[DATA_DROPS_KEY]] == ["broken", "cut"]
    assert DATA_DROPS_KEY not in DataCollator(pad_token_id=0)([dataset[0], dataset[3]])


@pytest.fixture(scope="module")
def train_workspace(tmp_path_factory):
    """Tiny LLM and vision folders and 32 synthetic samples (16 images, 2 questions each)."""
    from vlm.data.synth import generate_shapes_dataset
    from vlm.tiny import save_tiny_components

    root = tmp_path_factory.mktemp("train")
    data = generate_shapes_dataset(root / "data", n_train=16, n_eval=2, image_size=32, seed=0)
    records = json.loads(Path(data["train"]).read_text())
    texts = [turn["value"] for r in records for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"root": root, "llm": llm, "vision": vision, "records": records, "images": Path(data["image_folder"])}


def _plant_corrupt_image(ws, tmp_path: Path, bad: tuple[int, ...]) -> tuple[Path, list[str]]:
    """A copy of the data whose image paths are absolute, samples `bad` pointing at junk files of their own
    (they exist, so the default `--check_images exists` lets them through)."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(ws["images"], images)
    records = [dict(r, image=str(images / r["image"])) for r in ws["records"]]
    for i in bad:
        records[i]["image"] = str(images / f"junk{i}.png")
        Path(records[i]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, [records[i]["id"] for i in bad]


def _train_flags(ws, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", str(data),
            "--image_folder", str(data.parent / "images"), "--allow_absolute_image_paths", "True",
            "--output_dir", str(out), "--report_to", "none", "--use_cpu", "True", "--seed", "0",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--save_strategy", "no",
            "--logging_steps", "1", *extra]


def test_corrupt_image_mid_run_is_counted_replaced_and_reported(train_workspace, tmp_path, capsys):
    from vlm.cli.train import main as train_main

    data, bad_ids = _plant_corrupt_image(train_workspace, tmp_path, bad=(6,))
    out = tmp_path / "run"
    # absolute image paths: refused naming the flag without it (before any training), accepted with it
    flags = _train_flags(train_workspace, data, out, "--max_drop_ratio", "0.05", "--dataloader_num_workers", "1")
    no_flag = [f for f in flags if f not in ("--allow_absolute_image_paths", "True")]
    no_flag[no_flag.index(str(out))] = str(tmp_path / "refused")
    assert train_main(no_flag) == 2  # too many dropped: one line (a DataError), not a traceback
    assert "--allow_absolute_image_paths" in capsys.readouterr().err.strip().splitlines()[-1]
    assert train_main(flags) == 0  # a DataLoader worker met the image: the count crossed processes in the batch
    report = json.loads((out / "data_report.json").read_text())
    assert report["total"] == 32 and report["kept"] == 31 and report["dropped"] == {"unreadable_image": 1}
    [problem] = report["problems"]
    assert problem["id"] == bad_ids[0] and problem["index"] == 6 and problem["in_training"] is True
    assert problem["reason"] == "unreadable_image" and "junk6.png" in problem["detail"]
    assert report["notes"]["dropped_in_training"] == 1
    assert (out / "model.safetensors").is_file()  # the run completed
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # every step ran (32 samples / 4)
    assert f"sample {bad_ids[0]!r} (index 6) replaced: unreadable_image" in capsys.readouterr().out


def test_too_many_unreadable_images_stop_the_run_with_a_checkpoint_and_one_line(train_workspace, tmp_path, capsys):
    from vlm.cli.train import main as train_main

    data, bad_ids = _plant_corrupt_image(train_workspace, tmp_path, bad=(9,))
    out = tmp_path / "run"
    # 1 of 32 is 3.1%, more than the default --max_drop_ratio 0.01: stop at the step that meets it
    assert train_main(_train_flags(train_workspace, data, out, "--dataloader_num_workers", "0")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("train.py: error: stopped at step ")
    assert [line for line in err if line.startswith("train.py")] == err[-1:]  # one line
    step = int(err[-1].split("stopped at step ")[1].split(":")[0])
    assert step < 8  # before the end of the epoch
    assert "1 sample(s) could not be used while training (unreadable_image=1" in err[-1]
    assert f"checkpoint {out / f'checkpoint-{step}'}" in err[-1] and "--max_drop_ratio 0.01" in err[-1]
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "model.safetensors").exists()  # no final model for a run that did not finish
    report = json.loads((out / "data_report.json").read_text())
    assert report["kept"] == 31 and [p["id"] for p in report["problems"]] == bad_ids
    # the way out the line names: fix the image, rerun the same command; it resumes from the checkpoint and ends
    import shutil

    shutil.copy(train_workspace["images"] / train_workspace["records"][9]["image"], tmp_path / "images" / "junk9.png")
    assert train_main(_train_flags(train_workspace, data, out, "--dataloader_num_workers", "0")) == 0
    assert f"resuming from {out / f'checkpoint-{step}'}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()


def test_drops_met_by_different_ranks_are_gathered_and_stop_every_rank_at_one_step(train_workspace, tmp_path):
    """torchrun, 2 processes: samples 1 and 2 are bad and go to different ranks in the first step (whether the
    batches are split by sample or by batch); both reach rank 0's report, and both ranks stop at step 1 with
    one checkpoint and one line (a rank stopping alone would leave the other hanging in a collective)."""
    import os
    import subprocess
    import sys

    data, bad_ids = _plant_corrupt_image(train_workspace, tmp_path, bad=(1, 2))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    run = subprocess.run([*torchrun, *_train_flags(train_workspace, data, out, "--per_device_train_batch_size", "2",
                                                   "--train_sampling_strategy", "sequential",
                                                   "--dataloader_num_workers", "0")],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: stopped at step 1: 2 sample(s)"), run.stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text())
    assert sorted(p["id"] for p in report["problems"]) == sorted(bad_ids) and report["kept"] == 30
    assert (out / "checkpoint-1").is_dir() and not (out / "model.safetensors").exists()
