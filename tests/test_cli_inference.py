"""Command lines: test.py / test.sh (flags, aliases, demo default, errors), vlm chat, vlm generate."""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from inference_helpers import command, save_tiny_folder, write_image
from vlm.cli.chat import chat_loop
from vlm.generate.chat import ChatSession
from vlm.generate.decoding import GenerationSettings
from vlm.generate.generator import load_generator

batch_main = command("generate")  # `vlm generate` as the console runs it: a mistake is one line and exit 2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("model"), "clip", "qwen2", template="chatml", seed=1)


@pytest.fixture(scope="module")
def generator(model_dir):
    return load_generator(str(model_dir), settings=GenerationSettings(max_new_tokens=8))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return str(write_image(tmp_path_factory.mktemp("img") / "red.png"))


@pytest.fixture(scope="module")
def test_script():
    """test.py's functions, loaded under another name (`test` is also a standard-library package)."""
    return runpy.run_path(str(ROOT / "test.py"), run_name="vlm_test_script")


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


# -- test.py / test.sh ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    ["--model", "{m}", "--image", "{i}", "--prompt", "What color is the circle?"],
    ["--model-path", "{m}", "--image-file", "{i}", "--query", "What color is the circle?", "--temperature", "0",
     "--max-new-tokens", "8", "--conv-mode", "chatml"],
    ["--model_weights", "{m}", "--image_path", "{i}", "--prompt", "What color is the circle?",
     "--base_value_model", "openai/clip-vit-large-patch14"],
])
def test_test_py_prints_only_the_answer(test_script, capsys, generator, model_dir, image, flags):
    argv = [f.format(m=model_dir, i=image) for f in flags] + ["--max_new_tokens", "8"]
    assert test_script["main"](argv) == 0
    out = capsys.readouterr()
    expected = generator.answer("What color is the circle?", image)
    assert expected and out.out == expected + "\n"


def test_test_py_streams_to_a_terminal(test_script, capsys, monkeypatch, generator, model_dir, image):
    """Through StreamToFile (pieces as they come: tests/test_generate.py), not printed a second time."""
    from vlm.generate.decoding import StreamToFile

    streamed = []
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(StreamToFile, "on_finalized_text",
                        lambda self, text, stream_end=False: streamed.append(text) or self.file.write(text))
    argv = ["--model", str(model_dir), "--image", image, "--prompt", "What color is the circle?", "--max_new_tokens", "8"]
    assert test_script["main"](argv) == 0
    expected = generator.answer("What color is the circle?", image)
    assert "".join(streamed).strip() == expected
    assert capsys.readouterr().out.strip() == expected


def test_test_sh_runs_in_a_fresh_process(model_dir, image, generator):
    done = run_script("bash", "test.sh", "--model", str(model_dir), "--image", image, "--prompt",
                      "What color is the circle?", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout == generator.answer("What color is the circle?", image) + "\n"


def test_no_arguments_uses_the_demo_model_and_example_image(test_script, capsys, monkeypatch, model_dir, tmp_path):
    """Wiring only (decoding is tested above): the demo folder ($VLM_DEMO_DIR), the bundled image and its
    question, read from the package's assets (not from the repository)."""
    import vlm.assets
    from vlm.generate.generator import Generator

    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "model").symlink_to(model_dir)
    monkeypatch.setenv("VLM_DEMO_DIR", str(demo_dir))
    calls = []

    def fake_answer(self, question, image=None, *, stream=None):
        calls.append((self.model.vlm_config.num_image_tokens, question, image))
        return "ANSWER"

    monkeypatch.setattr(Generator, "answer", fake_answer)
    assert test_script["main"]([]) == 0
    out = capsys.readouterr()
    assets = Path(vlm.assets.__file__).parent / "examples"
    example = json.loads((assets / "shapes.json").read_text())
    assert calls == [(16, example["question"], str(assets / example["image"]))]
    assert out.out == "ANSWER\n"
    assert f"using the demo model {demo_dir / 'model'}" in out.err and "shapes.png" in out.err


def test_no_model_and_no_trained_demo_refuses_instead_of_training(test_script, capsys, monkeypatch, tmp_path):
    """Outside the repository `test.py` / `vlm ask` must not start the 8000-step demo by itself: it names the
    folder it looked in and the ways out; `--train-demo` trains there (run_demo stands in for the training)."""
    import vlm.demo

    trained = []
    monkeypatch.setattr(vlm.demo, "run_demo", lambda config: trained.append(config.run_dir))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLM_DEMO_DIR", raising=False)
    assert test_script["main"]([]) == 2
    err = capsys.readouterr().err
    assert f"no demo model in {tmp_path / 'runs' / 'demo' / 'model'}" in err
    assert "--model" in err and "--demo_dir" in err and "--train-demo" in err and len(err.splitlines()) == 1
    assert trained == [] and not (tmp_path / "runs").exists()

    elsewhere = tmp_path / "elsewhere"
    assert test_script["main"](["--demo_dir", str(elsewhere), "--prompt", "hi"]) == 2
    assert f"no demo model in {elsewhere / 'model'}" in capsys.readouterr().err

    # --train-demo: the demo is trained in the named folder (then loading fails: the stand-in saved nothing)
    assert test_script["main"](["--demo_dir", str(elsewhere), "--train-demo"]) == 2
    assert trained == [str(elsewhere)]


@pytest.mark.parametrize("flag", ["--load-4bit", "--load-8bit"])
def test_quantised_loading_answers_on_cpu(test_script, capsys, model_dir, image, flag):
    """bitsandbytes' CPU backend: the quantised model answers (the layers themselves: tests/test_qlora.py)."""
    pytest.importorskip("bitsandbytes")
    args = ["--model", str(model_dir), "--image", image, "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu"]
    assert test_script["main"](args + [flag]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n") and len(out.out.splitlines()) == 1


def test_unreadable_image_and_missing_model(test_script, capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert test_script["main"](["--model", str(model_dir), "--image", str(bad), "--prompt", "hi"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert test_script["main"](["--model", str(tmp_path / "none"), "--image", str(bad), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- vlm chat ---------------------------------------------------------------------------------------


def test_chat_keeps_history_resets_and_switches_images(generator, image, tmp_path):
    blue = str(write_image(tmp_path / "blue.png", (40, 80, 220), (30, 50)))
    lines = io.StringIO(f"What color is the circle?\nAnd the shape?\n/reset\nWhat color?\n/image {tmp_path}/none.png\n"
                        f"/image {blue}\nWhich one?\n/bogus\n/exit\nnever asked\n")
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(ChatSession(generator, image), lines, out, err, stream=False) == 0
    answers = out.getvalue().splitlines()
    first = generator.reply([{"role": "user", "content": "<image>\nWhat color is the circle?"}], [image])
    history = [{"role": "user", "content": "<image>\nWhat color is the circle?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And the shape?"}]
    second = generator.reply(history, [image])
    after_reset = generator.reply([{"role": "user", "content": "<image>\nWhat color?"}], [image])
    two_images = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": after_reset},
                  {"role": "user", "content": "<image>\nWhich one?"}]
    fourth = generator.reply(two_images, [image, blue])
    assert answers == [first, second, after_reset, fourth]
    assert "history cleared" in err.getvalue()
    assert "image file not found" in err.getvalue() and "none.png" in err.getvalue()
    assert "unknown command '/bogus'" in err.getvalue()


def test_chat_command_reads_stdin(monkeypatch, capsys, model_dir, image, generator):
    chat_main = command("chat")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What color is the circle?\n/exit\n"))
    assert chat_main(["--model", str(model_dir), "--image", image, "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out == generator.answer("What color is the circle?", image) + "\n"
    assert "template 'chatml'" in out.err and "/reset" in out.err


def test_chat_context_overflow_leaves_history_unchanged(generator, image):
    from vlm.generate.generator import Generator

    short = Generator(**{**generator.__dict__, "context_len": 60})
    session = ChatSession(short, image)
    lines = io.StringIO("What color is the circle?\n" + "word " * 80 + "\n")
    out, err = io.StringIO(), io.StringIO()
    chat_loop(session, lines, out, err, stream=False)
    assert len(out.getvalue().splitlines()) == 1
    assert "context of 60 tokens" in err.getvalue() and len(session.messages) == 2


# -- vlm generate -----------------------------------------------------------------------------------


def test_vlm_generate_answers_a_jsonl_file_in_batches(model_dir, generator, tmp_path):
    (tmp_path / "img").mkdir()
    red = write_image(tmp_path / "img" / "red.png")
    blue = write_image(tmp_path / "img" / "blue.png", (40, 80, 220), (30, 50))
    records = [{"id": "a", "image": "red.png", "question": "What color is the circle?", "extra": 1},
               {"id": "b", "image": "blue.png", "question": "How many shapes are there?"},
               {"id": "c", "question": "Is there a blue square?"},
               {"id": "d", "image": str(blue), "question": "What shape is the blue object in the picture?"},
               {"id": "e", "image": "red.png", "question": "yes?"}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers_file = tmp_path / "out" / "a.jsonl"
    argv = ["--model", str(model_dir), "--input", str(questions), "--output", str(answers_file), "--image_folder",
            str(tmp_path / "img"), "--batch_size", "2", "--max_new_tokens", "8", "--no-progress"]
    assert batch_main(argv) == 0
    written = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [w["id"] for w in written] == ["a", "b", "c", "d", "e"] and written[0]["extra"] == 1
    paths = {"red.png": str(red), "blue.png": str(blue), str(blue): str(blue)}
    expected = [generator.answer(r["question"], paths.get(r.get("image"))) for r in records]
    assert [w["answer"] for w in written] == expected
    assert len(set(expected)) > 1


def test_vlm_generate_names_the_bad_line(model_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "a", "question": "hi"}\n{"id": "b", "image": "gone.png", "question": "hi"}\n')
    argv = ["--model", str(model_dir), "--input", str(questions), "--output", str(tmp_path / "a.jsonl")]
    assert batch_main(argv) == 1  # the bad line is reported, the good one answered (tests/test_runtime_data.py)
    assert "q.jsonl line 2 (id 'b'): missing_image: image 'gone.png' not found" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == ["a"]
    questions.write_text('{"id": "a", "prompt": "hi"}\n')
    assert batch_main(argv) == 1
    assert "line 1 (id 'a'): bad_schema: expected an object with a 'question' string" in capsys.readouterr().err
    assert (tmp_path / "a.jsonl").read_text() == ""


# -- the chat template: the model's own by default, another one only when forced -------------------------


def _eval_set(folder: Path) -> list[str]:
    (folder / "img").mkdir()
    write_image(folder / "img" / "red.png")
    write_image(folder / "img" / "blue.png", (40, 80, 220), (30, 50))
    records = [{"id": name, "image": f"{name}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": name}]}
        for name in ("red", "blue")]
    (folder / "eval.json").write_text(json.dumps(records))
    return ["--data_path", str(folder / "eval.json"), "--image_folder", str(folder / "img"), "--batch_size", "2"]


def test_vlm_eval_uses_the_models_template_and_refuses_another_unless_forced(tmp_path, monkeypatch, capsys):
    import vlm.cli.eval

    folder = save_tiny_folder(tmp_path / "m", "clip", "qwen2", template="vicuna_v1", seed=1)
    argv = ["--model", str(folder), *_eval_set(tmp_path)]
    eval_main = command("eval")
    used, real = [], vlm.cli.eval.evaluate
    monkeypatch.setattr(vlm.cli.eval, "evaluate",
                        lambda generator, *a, **k: used.append(generator.template) or real(generator, *a, **k))
    assert eval_main(argv) == 0
    assert used == ["vicuna_v1"]  # the folder's own, no longer a fixed chatml
    assert "template: 'vicuna_v1'" in capsys.readouterr().err
    assert eval_main([*argv, "--template", "chatml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'vicuna_v1'" in err and "--template 'chatml'" in err and "--force-template" in err
    assert used == ["vicuna_v1"]  # refused before evaluating
    assert eval_main([*argv, "--template", "chatml", "--force-template"]) == 0
    assert used == ["vicuna_v1", "chatml"] and "warning:" in capsys.readouterr().err
    assert eval_main([*argv, "--template", "v1"]) == 0  # LLaVA's name for the same template
    assert used[-1] == "v1"


def test_conv_mode_mismatch_is_refused_by_chat_and_generate(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What color is the circle?\n"))
    assert command("chat")(["--model", str(model_dir), "--conv-mode", "vicuna_v1"]) == 2
    assert "trained with chat template 'chatml'" in capsys.readouterr().err
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "What color?"}) + "\n")
    argv = ["--model", str(model_dir), "--input", str(questions), "--output", str(tmp_path / "a.jsonl"),
            "--conv-mode", "vicuna_v1", "--no-progress", "--max_new_tokens", "4"]
    assert batch_main(argv) == 2
    assert "--conv-mode 'vicuna_v1'" in capsys.readouterr().err
    assert batch_main([*argv, "--force-template"]) == 0 and "warning:" in capsys.readouterr().err


# -- vlm chat at a terminal: readline, Ctrl-C, Ctrl-D, no image ------------------------------------------


class ScriptedInput:
    """A stdin that says it is a terminal; each entry is a line typed, KeyboardInterrupt (Ctrl-C) raised, or ''
    (Ctrl-D)."""

    def __init__(self, *entries):
        self.entries = list(entries)

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        entry = self.entries.pop(0) if self.entries else ""
        if entry is KeyboardInterrupt:
            raise KeyboardInterrupt
        return entry


class TerminalOut(io.StringIO):
    def isatty(self) -> bool:
        return True


class ScriptedGenerator:
    """Answers 'answer N'; an answer listed in `interrupt` raises KeyboardInterrupt instead (Ctrl-C mid-answer)."""

    template = "chatml"

    def __init__(self, interrupt=()):
        self.calls, self.interrupt = [], set(interrupt)

    def reply(self, messages, images, *, stream=None):
        self.calls.append((messages, list(images)))
        if len(self.calls) in self.interrupt:
            raise KeyboardInterrupt
        return f"answer {len(self.calls)}"


def test_chat_ctrl_c_clears_the_line_or_stops_the_answer_and_ctrl_d_says_bye():
    session = ChatSession(ScriptedGenerator(interrupt={1}))
    lines = ScriptedInput(KeyboardInterrupt, "first\n", "second\n", "")
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(session, lines, out, err, stream=False) == 0
    assert out.getvalue() == "answer 2\n"
    # the interrupted question left no trace: the history is the second exchange only
    assert session.messages == [{"role": "user", "content": "second"}, {"role": "assistant", "content": "answer 2"}]
    assert "answer interrupted" in err.getvalue() and err.getvalue().endswith("\nbye\n")
    assert "Traceback" not in err.getvalue()


def test_chat_notes_once_that_no_image_is_attached(image):
    from vlm.cli.chat import NO_IMAGE

    err = io.StringIO()
    chat_loop(ChatSession(ScriptedGenerator()), io.StringIO("one\ntwo\n"), io.StringIO(), err, stream=False)
    assert err.getvalue().count(NO_IMAGE) == 1
    err = io.StringIO()
    chat_loop(ChatSession(ScriptedGenerator(), image), io.StringIO("one\ntwo\n"), io.StringIO(), err, stream=False)
    assert NO_IMAGE not in err.getvalue()


def test_chat_reads_through_readline_only_at_a_terminal(monkeypatch):
    from vlm.cli.chat import PROMPT

    monkeypatch.delitem(sys.modules, "readline", raising=False)
    chat_loop(ChatSession(ScriptedGenerator()), io.StringIO("hi\n"), io.StringIO(), io.StringIO(), stream=False)
    assert "readline" not in sys.modules  # piped input: no line editing, nothing imported
    stdin, stdout, err = ScriptedInput("hi\n", KeyboardInterrupt, "again\n", ""), TerminalOut(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    generator = ScriptedGenerator()
    assert chat_loop(ChatSession(generator), sys.stdin, sys.stdout, err, stream=False) == 0
    assert "readline" in sys.modules  # imported: input() now edits lines and keeps the session's history
    assert stdout.getvalue().count(PROMPT) == 4 and PROMPT not in err.getvalue()  # input()'s prompt, each read
    assert [m[-1]["content"] for m, _ in generator.calls] == ["hi", "again"]
    assert err.getvalue().endswith("\nbye\n")


# -- vlm generate with LLaVA's question and answer files --------------------------------------------------


def _llava_questions(tmp_path: Path) -> tuple[Path, list[dict]]:
    (tmp_path / "img").mkdir(exist_ok=True)
    write_image(tmp_path / "img" / "red.png")
    write_image(tmp_path / "img" / "blue.png", (40, 80, 220), (30, 50))
    questions = [{"question_id": 0, "image": "red.png", "text": "What color is the circle?", "category": "conv"},
                 {"question_id": 1, "image": "blue.png", "text": "How many shapes are there?", "category": "detail"},
                 {"question_id": "q2", "image": "red.png", "text": "Is there a blue square?"}]
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path, questions


def test_vlm_generate_reads_llava_question_files_and_writes_llava_answer_files(model_dir, generator, tmp_path):
    """LLaVA's llava/eval/model_vqa.py, per question line {question_id, image, text}: prompt '<image>\\n' + text,
    then writes {"question_id": id, "prompt": text, "text": answer, "answer_id": a fresh shortuuid,
    "model_id": get_model_name_from_path(model_path), "metadata": {}} in that key order."""
    questions_file, questions = _llava_questions(tmp_path)
    answers_file = tmp_path / "answers" / "merge.jsonl"
    argv = ["--model-path", str(model_dir), "--question-file", str(questions_file), "--image-folder",
            str(tmp_path / "img"), "--answers-file", str(answers_file), "--temperature", "0", "--max_new_tokens", "8",
            "--no-progress"]
    assert batch_main(argv) == 0
    lines = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [list(line) for line in lines] == [["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]] * 3
    assert [line["question_id"] for line in lines] == [0, 1, "q2"]
    assert [line["prompt"] for line in lines] == [q["text"] for q in questions]
    for line, q in zip(lines, questions):
        image = str(tmp_path / "img" / q["image"])
        llava_prompt = [{"role": "user", "content": "<image>\n" + q["text"]}]  # model_vqa's DEFAULT_IMAGE_TOKEN + '\n'
        assert generator.prompt(llava_prompt, 1) == generator.prompt([{"role": "user", "content": q["text"]}], 1)
        assert line["text"] == generator.reply(llava_prompt, [image])
    assert len({line["answer_id"] for line in lines}) == 3 and all(isinstance(line["answer_id"], str) for line in lines)
    assert {line["model_id"] for line in lines} == {model_dir.name} and all(line["metadata"] == {} for line in lines)


def test_llava_model_id_and_chunks_follow_llava():
    from vlm.generate.batch import chunk, model_id

    assert model_id("runs/llava-v1.5-13b/checkpoint-5000") == "llava-v1.5-13b_checkpoint-5000"
    assert model_id("liuhaotian/llava-v1.5-7b/") == "llava-v1.5-7b"
    # LLaVA's split_list: slices of ceil(n / chunks)
    assert [chunk(list(range(5)), 2, k) for k in (0, 1)] == [[0, 1, 2], [3, 4]]
    assert [chunk(list(range(3)), 4, k) for k in range(4)] == [[0], [1], [2], []]


def test_vlm_generate_answers_one_llava_chunk_and_refuses_mixed_files(model_dir, tmp_path, capsys):
    questions_file, _ = _llava_questions(tmp_path)
    out = tmp_path / "chunk1.jsonl"
    argv = ["--model", str(model_dir), "--question-file", str(questions_file), "--image_folder", str(tmp_path / "img"),
            "--answers-file", str(out), "--max_new_tokens", "4", "--no-progress"]
    assert batch_main([*argv, "--num-chunks", "2", "--chunk-idx", "1"]) == 0
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == ["q2"]
    with open(questions_file, "a") as f:
        f.write(json.dumps({"id": "x", "question": "What color?"}) + "\n")
    assert batch_main(argv) == 1
    assert "question.jsonl line 4 (id 'x'): bad_schema: a vlm question in a file of llava questions" in capsys.readouterr().err
