"""Issue 10, point 10: a user mistake prints one line naming the thing (file, field, flag, line) and exits 2.

Each test plants one fault in a copy of a tiny model folder (or in the input) and runs the command or the
function a user would, asserting the exit code, the one line and what it names, and that no traceback
escaped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from inference_helpers import command, save_tiny_folder, write_image

import vlm
from vlm.config import VLMConfig
from vlm.folders.kinds import record_template


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("one_line") / "model")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("one_line_images") / "img.png")


def planted(model_dir: Path, tmp_path: Path, name: str = "config.json", *, text: str | None = None, edit=None) -> Path:
    """A copy of the model folder with `name` replaced by `text`, or its JSON changed by `edit(data)`."""
    folder = tmp_path / "planted"
    shutil.copytree(model_dir, folder)
    path = folder / name
    if edit is not None:
        data = json.loads(path.read_text())
        data = edit(data) or data
        text = json.dumps(data)
    path.write_text(text)
    return folder


def one_line(err: str) -> str:
    """The single line a command printed; fails when there are more or a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def chat_load(folder: Path, capsys, monkeypatch, *extra: str) -> tuple[int, str]:
    """`vlm chat --model folder` with empty stdin: the model loads (or fails to) and the chat ends."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = command("chat")(["--model", str(folder), "--max_new_tokens", "2", *extra])
    return code, capsys.readouterr().err


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


# ---------------------------------------------------------------------------------------------------------
# config.json


CONFIG_FAULTS = {
    "not_json": dict(text="{not json"),
    "not_utf8": dict(text="{}"),  # rewritten below as raw bytes
    "a_list": dict(edit=lambda data: [data]),
    "image_token_id_str": dict(edit=_set("image_token_id", "5")),
    "image_token_id_bool": dict(edit=_set("image_token_id", True)),
    "projector_type_int": dict(edit=_set("projector.type", 5)),
    "select_layer_str": dict(edit=_set("vision.select_layer", "abc")),
    "vision_null": dict(edit=_set("vision", None)),
    "llm_list": dict(edit=_set("llm", [1, 2])),
    "frozen_str": dict(edit=_set("vision.frozen", "yes")),
}
CONFIG_NAMES = {  # what the line must name
    "not_json": "not valid JSON (line 1, column 2",
    "not_utf8": "not UTF-8",
    "a_list": "must hold a JSON object, got a list",
    "image_token_id_str": "image_token_id='5' (str) must be an integer",
    "image_token_id_bool": "image_token_id=True (bool) must be an integer",
    "projector_type_int": "projector.type=5 (int) must be a string",
    "select_layer_str": "vision.select_layer='abc' (str) must be an integer",
    "vision_null": "'vision' must be a JSON object, got null",
    "llm_list": "'llm' must be a JSON object, got [1, 2]",
    "frozen_str": "vision.frozen='yes' (str) must be true or false",
}


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_bad_config_json_is_one_line_naming_the_file_and_field(fault, model_dir, tmp_path, capsys, monkeypatch):
    folder = planted(model_dir, tmp_path, **CONFIG_FAULTS[fault])
    if fault == "not_utf8":
        (folder / "config.json").write_bytes(b'{"vision": "\xff"}')
    code, err = chat_load(folder, capsys, monkeypatch)
    line = one_line(err)
    assert code == 2
    assert str(folder / "config.json") in line and CONFIG_NAMES[fault] in line, line


def test_config_types_are_checked_in_python_too():
    from vlm.tiny import tiny_vlm_config

    config = tiny_vlm_config()
    with pytest.raises(ValueError, match=r"vision.select_layer='abc' \(str\) must be an integer"):
        config.replace(vision=dataclasses.replace(config.vision, select_layer="abc"))  # read-only: a validated copy
    with pytest.raises(ValueError, match=r"must be a JSON object, got null"):
        VLMConfig.from_dict({**tiny_vlm_config().to_dict(), "projector": None})


# ---------------------------------------------------------------------------------------------------------
# sizes: refused before anything is allocated


SIZE_FAULTS = {
    # 400M vocabulary: 102 GB asked of the allocator at once
    "vocab_400M": ("config.json", _set("llm.hf_config.vocab_size", 400_000_000),
                   "llm.hf_config.vocab_size=400000000 is not a size a model can have"),
    # within each bound, together far beyond any machine's memory
    "weights_beyond_memory": ("config.json", lambda d: d["llm"]["hf_config"].update(vocab_size=16_000_000,
                                                                                      hidden_size=60_000),
                              "for the weights alone, more than this machine's"),
    # the tower's position table: 80 GB
    "tower_200000px": ("config.json", _set("vision.hf_config.image_size", 200_000),
                       "vision.hf_config.image_size=200000 is not a size a model can have"),
    "tower_too_many_patches": ("config.json", lambda d: d["vision"]["hf_config"].update(image_size=8192, patch_size=1),
                               "67,108,864 patches per image"),
    # resizing an image to 200,000 px takes minutes, then MemoryError
    "processor_200000px": ("preprocessor_config.json",
                           lambda d: d.update(size={"shortest_edge": 200_000}, crop_size={"height": 200_000, "width": 200_000}),
                           "image_size=200000 is beyond any vision tower's input"),
    # fails deep in the tower with a position-embedding shape error
    "processor_does_not_fit_tower": ("preprocessor_config.json",
                                     lambda d: d.update(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
                                     "makes 48x48 images but the vision tower takes 32x32"),
}


@pytest.mark.parametrize("fault", sorted(SIZE_FAULTS))
def test_absurd_or_mismatched_sizes_are_refused_before_allocating(fault, model_dir, tmp_path, capsys, monkeypatch):
    import time

    name, edit, expected = SIZE_FAULTS[fault]
    folder = planted(model_dir, tmp_path, name, edit=edit)
    start = time.perf_counter()
    code, err = chat_load(folder, capsys, monkeypatch)
    line = one_line(err)
    assert code == 2 and str(folder / name) in line and expected in line, line
    assert time.perf_counter() - start < 30  # refused, not attempted


def test_tower_refuses_pixels_of_another_size():
    import torch

    from vlm.tiny import tiny_vision_config
    from vlm.config import VisionConfig
    from vlm.visual.tower import VisionTower

    tower = VisionTower.from_config(VisionConfig(hf_config=tiny_vision_config().to_dict()), load_weights=False)
    assert tower(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match=r"pixel_values of shape \(1, 3, 48, 48\); the vision tower takes \(N, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 48, 48))


# ---------------------------------------------------------------------------------------------------------
# flags


@pytest.mark.parametrize("flags, expected", [
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--temperature", "nan"], "temperature=nan must be a finite number >= 0"),
    (["--temperature", "inf"], "temperature=inf must be a finite number >= 0"),
    (["--top_p", "nan"], "top_p=nan must be in (0, 1]"),
])
def test_bad_decoding_and_device_flags(flags, expected, model_dir, capsys, monkeypatch):
    code, err = chat_load(model_dir, capsys, monkeypatch, *flags)
    line = one_line(err)
    assert code == 2 and expected in line, line


def test_cuda_without_cuda_is_one_line(model_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = chat_load(model_dir, capsys, monkeypatch, "--device", "cuda")
    line = one_line(err)
    assert code == 2 and "--device 'cuda' but this machine has no CUDA GPU" in line and "--device cpu" in line, line


# ---------------------------------------------------------------------------------------------------------
# vlm chat: input that is not UTF-8


def test_invalid_utf8_piped_into_chat_names_the_line_and_answers_the_rest(model_dir):
    import subprocess

    stdin = b"What color is the circle?\nhello \xff\xfe there\nIs there a blue square?\n"
    proc = subprocess.run([sys.executable, "-m", "vlm", "chat", "--model", str(model_dir), "--max_new_tokens", "2"],
                          input=stdin, capture_output=True, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    bad = [line for line in err.splitlines() if line.startswith("error:")]
    assert bad == ["error: input line 2 is not UTF-8 text (byte 0xff at column 7); line skipped: save the questions "
                   "as UTF-8"], err
    assert len(proc.stdout.decode("utf-8", "replace").splitlines()) == 2  # lines 1 and 3 answered
    assert proc.returncode == 2  # piped: an answer is missing, the exit code says so


# ---------------------------------------------------------------------------------------------------------
# vlm generate: a too-long question, two <image> (batch.py names the line and id from our UserError)


def test_generate_names_line_and_id_of_two_images_and_too_long_question(model_dir, image, tmp_path, capsys):
    from vlm.cli.generate import main as batch_main

    questions = tmp_path / "q.jsonl"
    rows = [{"id": "ok", "image": str(image.name), "question": "What color?"},
            {"id": "two", "image": str(image.name), "question": "<image> and <image>: what color?"},
            {"id": "long", "image": str(image.name), "question": "word " * 3000}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(image, tmp_path / image.name)
    code = batch_main(["--model", str(model_dir), "--input", str(questions), "--output", str(tmp_path / "a.jsonl"),
                       "--no-progress", "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code != 0
    two = [line for line in err.splitlines() if "line 2 (id 'two')" in line]
    long = [line for line in err.splitlines() if "line 3 (id 'long')" in line]
    assert len(two) == 1 and "2 <image> placeholder(s) in the text but 1 image(s)" in two[0], err
    assert len(long) == 1 and "leaves no room to answer in the model's context of" in long[0], err
    assert [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == ["ok"]


def test_prompt_errors_are_user_errors_for_the_entry_points(model_dir, image):
    from vlm.errors import UserError
    from vlm.generate.generator import load_generator

    generator = load_generator(str(model_dir))
    for question, images in [("<image> <image> what?", [str(image)]), ("word " * 3000, [str(image)])]:
        with pytest.raises(UserError):
            generator.answer_batch([question], images)


# ---------------------------------------------------------------------------------------------------------
# vlm eval


EVAL_FAULTS = {
    "dotdot": ({"id": "a", "image": "../img.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                  {"from": "gpt", "value": "red"}]},
               "record 1 (0-based, id 'a'): unsafe_path: image path '../img.png' leaves --image_folder"),
    "no_conversations": ({"id": "b", "image": "img.png"},
                         "record 1 (0-based, id 'b'): no 'conversations' list (the record's keys: ['id', 'image'])"),
    "image_int": ({"id": "c", "image": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                  "record 1 (0-based, id 'c'): 'image' must be a file name or a list of file names, got 5"),
}


@pytest.mark.parametrize("fault", sorted(EVAL_FAULTS))
def test_eval_bad_record_is_one_line_naming_the_record(fault, model_dir, image, tmp_path, capsys, monkeypatch):
    good = {"id": "g", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                             {"from": "gpt", "value": "red"}]}
    record, expected = EVAL_FAULTS[fault]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([good, record, dict(record, id="second")]))
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(image, folder / "img.png")
    loaded = []
    monkeypatch.setattr(vlm, "from_pretrained", lambda *a, **k: loaded.append(a))
    code = command("eval")(["--model", str(model_dir), "--data_path", str(data), "--image_folder", str(folder)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and str(data) in line and expected in line and "(1 more bad record(s))" in line, line
    assert loaded == []  # refused before the model loads


def test_eval_batch_size_zero_is_a_flag_error(model_dir, tmp_path, capsys):
    import vlm.cli.eval

    with pytest.raises(SystemExit) as exited:
        vlm.cli.eval.main(["--model", str(model_dir), "--data_path", "x.json", "--image_folder", ".", "--batch_size", "0"])
    assert exited.value.code == 2 and "--batch_size=0 must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# chat templates: a template that reaches outside Jinja's sandbox


def test_template_escape_is_one_line_naming_the_template(model_dir, image, tmp_path, capsys, monkeypatch):
    folder = planted(model_dir, tmp_path, "chat_template.jinja",
                     text="{{ ''.__class__.__mro__[1].__subclasses__() }}"
                          "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    record_template(folder, "tokenizer")
    code, err = chat_load(folder, capsys, monkeypatch)
    line = one_line(err)
    assert code == 2
    assert f"the chat_template of {folder}" in line and "blocked by Jinja's sandbox: SecurityError" in line, line
    assert "built-in" in line


# ---------------------------------------------------------------------------------------------------------
# weight files: corrupt safetensors, a pickle that would run code


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


WEIGHT_FAULTS = {
    "truncated": (_truncate, "incomplete metadata"),
    "garbage": (lambda p: p.write_bytes(bytes(range(256)) * 3), "header too large"),
    "huge_header": (lambda p: p.write_bytes((2**40).to_bytes(8, "little") + b"{}"), "header too large"),
    "empty": (lambda p: p.write_bytes(b""), "header too small"),
    "bad_header_json": (lambda p: p.write_bytes((5).to_bytes(8, "little") + b"{abc}"), "invalid JSON in header"),
}


@pytest.mark.parametrize("fault", sorted(WEIGHT_FAULTS))
def test_corrupt_safetensors_is_one_line_naming_the_file(fault, model_dir, tmp_path, capsys, monkeypatch):
    folder = planted(model_dir, tmp_path, "vlm_generation.json", text=json.dumps({"template": "chatml"}))
    plant, reason = WEIGHT_FAULTS[fault]
    plant(folder / "model.safetensors")
    code, err = chat_load(folder, capsys, monkeypatch)
    line = one_line(err)
    assert code == 2 and f"{folder / 'model.safetensors'} is not a readable safetensors file" in line, line
    assert reason in line and "save or download it again" in line


class _Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for a malicious `pytorch_model.bin`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_naming_the_file_without_suggesting_weights_only_false(tmp_path):
    import torch

    from vlm.folders.weights import read_pickled_weights

    marker = tmp_path / "ran"
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, evil)
    with pytest.raises(ValueError) as caught:
        read_pickled_weights(evil)
    message = str(caught.value)
    assert str(evil) in message and "holds objects other than tensors" in message and "not loaded" in message
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()  # nothing ran
    plain = tmp_path / "plain.bin"
    torch.save({"w": torch.arange(3.0)}, plain)
    assert torch.equal(read_pickled_weights(plain)["w"], torch.arange(3.0))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(plain.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"truncated\.bin is not a readable PyTorch weights file"):
        read_pickled_weights(truncated)


# ---------------------------------------------------------------------------------------------------------
# a LoRA run whose adapter_config.json disagrees with its weights


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    import torch
    from transformers import Qwen2ForCausalLM

    from vlm.data.tokenizer import build_tokenizer
    from vlm.folders.lora import apply_lora, save_lora_run
    from vlm.tiny import tiny_llm_config, tiny_vision_config

    root = tmp_path_factory.mktemp("one_line_lora")
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_llm_config("qwen2", vocab_size=256)).save_pretrained(root / "base")
    tokenizer = build_tokenizer(["what color is the circle? red green blue square"] * 3, vocab_size=300)
    config = vlm.VLMConfig(vision=vlm.VisionConfig(hf_config=tiny_vision_config().to_dict()),
                           llm=vlm.LLMConfig(name_or_path=str(root / "base")))
    model = apply_lora(vlm.build_model(config, tokenizer=tokenizer), r=4, alpha=8)
    save_lora_run(model, root / "run", tokenizer=tokenizer)
    return root / "run"


def test_lora_rank_that_disagrees_with_the_weights_is_one_line(lora_run, tmp_path, capsys):
    from vlm.cli import main as vlm_main

    bad = planted(lora_run, tmp_path, "adapter_config.json", edit=_set("r", 8))
    code = vlm_main(["merge-lora", "--model-path", str(bad), "--output", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "size mismatch" not in err
    line = [line for line in err.splitlines() if "adapter_config.json" in line]
    assert code == 2 and len(line) == 1, err
    assert f"{bad / 'adapter_config.json'} says r=8 but adapter_model.safetensors holds rank-4 adapters" in line[0]
    assert not (tmp_path / "merged").exists()
    # the untouched run merges
    assert vlm_main(["merge-lora", "--model-path", str(lora_run), "--output", str(tmp_path / "good")]) == 0


# ---------------------------------------------------------------------------------------------------------
# the `vlm` command: a UserError a subcommand lets through is one line and exit 2


def test_vlm_command_turns_an_uncaught_user_error_into_one_line(monkeypatch, capsys):
    import vlm.cli.eval
    from vlm.cli import main as vlm_main

    from vlm.errors import UserError

    def raising(argv):
        raise UserError("data.json record 3: no 'conversations'")

    monkeypatch.setattr(vlm.cli.eval, "main", raising)
    assert vlm_main(["eval"]) == 2
    assert one_line(capsys.readouterr().err) == "vlm eval: error: data.json record 3: no 'conversations'"


# ---------------------------------------------------------------------------------------------------------
# disk full


def test_eval_prints_the_result_before_a_full_disk_refuses_the_output(model_dir, image, tmp_path, capsys, monkeypatch):
    import vlm.cli.eval

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux) to fill the disk")
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"id": "g", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}]}]))
    shutil.copy(image, tmp_path / "img.png")
    from vlm.eval.evaluate import EvalResult

    result = EvalResult("exact", {"exact": 1.0}, 1, [], blind_scores={"exact": 0.0})
    monkeypatch.setattr(vlm.cli.eval, "evaluate", lambda *a, **k: result)
    code = command("eval")(["--model", str(model_dir), "--data_path", str(data), "--image_folder", str(tmp_path),
                            "--output", "/dev/full"])
    out, err = capsys.readouterr()
    assert code == 2 and "exact=1.0000 blind_exact=0.0000" in out
    assert one_line(err.replace("template: 'chatml'\n", "")) == ("vlm eval: error: no space left on device writing --output '/dev/full'; the result is "
                             "printed above: free space or choose another --output")


def test_vlm_command_names_the_file_when_the_disk_is_full(monkeypatch, capsys):
    import errno

    import vlm.cli.eval
    from vlm.cli import main as vlm_main

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoint-5/model.safetensors")

    monkeypatch.setattr(vlm.cli.eval, "main", full)
    assert vlm_main(["eval"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("vlm eval: error: no space left on device writing 'runs/x/checkpoint-5/model.safetensors'")


def test_vlm_command_says_disk_full_when_safetensors_cannot_write(monkeypatch, capsys):
    """What a full disk looks like mid-training (measured on a 400 KiB tmpfs: save_file raises this)."""
    from safetensors import SafetensorError

    import vlm.cli.eval
    from vlm.cli import main as vlm_main

    def full(argv):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(vlm.cli.eval, "main", full)
    assert vlm_main(["eval", "--output", "runs/x/eval.json"]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        "vlm eval: error: no space left on device under --output 'runs/x/eval.json'; free space")

    def other(argv):
        raise SafetensorError("Error while deserializing header: header too large")

    monkeypatch.setattr(vlm.cli.eval, "main", other)
    with pytest.raises(SafetensorError):  # not a full disk: not called one
        vlm_main(["eval"])


def test_train_py_says_disk_full_in_one_line(monkeypatch, capsys, tmp_path):
    """`python train.py` (not only `vlm train`): a save that runs out of space is one line naming the output
    folder and how to resume, exit 2; any other error keeps its traceback."""
    from safetensors import SafetensorError

    import vlm.cli.train as train_cli

    def full(*args):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(train_cli, "train", full)
    argv = ["--model_name_or_path", "x", "--vision_tower", "y", "--data_path", "d.json",
            "--output_dir", str(tmp_path / "run")]
    assert train_cli.main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"train.py: error: no space left on device under --output_dir '{tmp_path / 'run'}'")
    assert "resume" in line

    def bug(*args):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setattr(train_cli, "train", bug)
    with pytest.raises(RuntimeError):
        train_cli.main(argv)
