"""Basic-VLM verbatim: its train.sh flag set (no --lora_enable, Qwen-1 targets, image map with `path`, no
--image_folder) trains a LoRA run on a Qwen2 LLM; its test.sh line answers for a LoRA run and a full run."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from inference_helpers import write_image
from vlm.folders.lora import load_lora_run, translate_qwen1_targets
from vlm.tiny import save_tiny_components
from vlm.train.arguments import parse_args
from vlm.cli.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


@pytest.fixture(scope="module")
def basic_vlm_data(tmp_path_factory):
    """Basic-VLM's files as its process_image.py writes them: image_map.json entries carry the image's folder
    (`path`), captions.json questions put `<|extra_0|>` where the image goes. No image folder is passed."""
    root = tmp_path_factory.mktemp("basic_vlm")
    images = root / "raw" / "pictures"
    images.mkdir(parents=True)
    image_map, captions = {}, {}
    for i, (name, colour) in enumerate(list(COLOURS.items()) * 2):
        file = f"{name}{i}.png"
        write_image(images / file, colour, size=(32, 32))
        image_map[file] = {"image_file": file, "ID": i, "path": str(images)}
        captions[str(i)] = {"q": "这张图片是什么颜色？<|extra_0|>", "a": f"{name} circle"}
    (root / "image_map.json").write_text(json.dumps(image_map, ensure_ascii=False))
    (root / "captions.json").write_text(json.dumps(captions, ensure_ascii=False))
    texts = ["这张图片是什么颜色？ red green blue circle"] * 4
    llm, vision = save_tiny_components(root / "models", texts)  # a Qwen2 LLM: q/k/v/o, gate/up/down
    return {"root": root, "llm": llm, "vision": vision, "image": str(images / "red0.png"),
            "image_map": str(root / "image_map.json"), "captions": str(root / "captions.json")}


def basic_vlm_flags(data, out, *lora: str) -> list[str]:
    """Basic-VLM's train.sh flags (its LoRA flags are `lora`), plus what keeps the run short on a CPU."""
    return ["--base_language_model", data["llm"], "--base_value_model", data["vision"], *lora,
            "--feature_proj_lr", "1e-4", "--image_map", data["image_map"], "--captions_file", data["captions"],
            "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no", "--dataloader_num_workers", "0"]


BASIC_VLM_LORA = ("--lora_rank", "8", "--lora_dropout", "0.10", "--target_modules", "c_attn|w1|w2")


@pytest.fixture(scope="module")
def lora_run(basic_vlm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bv_lora") / "run"
    capture = out.parent / "stdout.txt"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert train_main(basic_vlm_flags(basic_vlm_data, out, *BASIC_VLM_LORA)) == 0
    capture.write_text(buffer.getvalue())
    return out, buffer.getvalue()


@pytest.fixture(scope="module")
def full_run(basic_vlm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bv_full") / "run"
    assert train_main(basic_vlm_flags(basic_vlm_data, out)) == 0
    return out


def test_train_sh_flags_train_lora_on_the_qwen2_equivalents_of_qwen1_targets(basic_vlm_data, lora_run):
    out, log = lora_run
    assert "without --lora_enable: training with LoRA" in log
    assert "names Qwen-1 layers" in log and "c_attn -> q_proj, k_proj, v_proj" in log
    assert "w1 -> up_proj" in log and "w2 -> gate_proj" in log
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_dropout"] == 0.10
    wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in load_file(out / "adapter_model.safetensors")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    # Images were found at the image map's `path` folders: nothing dropped.
    report = json.loads((out / "data_report.json").read_text())
    assert report["kept"] == report["total"] == 6 and report["dropped"] == {}
    # A LoRA run: the LLM's own weights are the base's, untouched; the adapters and projector trained.
    non_lora = load_file(out / "non_lora_trainables.safetensors")
    assert not any(k.startswith("model.layers.") for k in non_lora)
    base = Qwen2ForCausalLM.from_pretrained(basic_vlm_data["llm"]).state_dict()
    model = load_lora_run(out)
    plain = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(plain[key], base[key]), key
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # B starts at zero: it moved, so LoRA trained


def test_qwen1_names_follow_the_modules_that_exist():
    qwen2 = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert translate_qwen1_targets("c_attn|c_proj|w1|w2", qwen2)[0] == \
        "q_proj|k_proj|v_proj|o_proj|down_proj|up_proj|gate_proj"
    qwen1 = {"c_attn", "c_proj", "w1", "w2"}  # a real Qwen-1 keeps its names
    assert translate_qwen1_targets("c_attn|w1|w2", qwen1) == ("c_attn|w1|w2", [])
    assert translate_qwen1_targets(["c_attn"], {"qkv_proj", "o_proj"}) == (["c_attn"], [])  # no equivalent: unchanged


def test_lora_enable_false_with_lora_flags_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--lora_enable False contradicts --lora_r/--lora_rank"):
        parse_args(["--lora_enable", "False", "--lora_rank", "8", "--output_dir", str(tmp_path)])
    assert train_main(["--lora_enable", "False", "--lora_rank", "8", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: --lora_enable False contradicts")
    _, _, args = parse_args(["--output_dir", str(tmp_path)])
    assert args.lora_enable is False and args.lora_r == 64  # no LoRA flag: full fine-tuning, LLaVA's defaults
    _, _, args = parse_args(["--lora_enable", "--output_dir", str(tmp_path)])
    assert args.lora_enable is True


@pytest.fixture(scope="module")
def test_script():
    return runpy.run_path(str(ROOT / "test.py"), run_name="vlm_test_script")


@pytest.mark.parametrize("which", ["lora", "full"])
def test_test_sh_line_answers(basic_vlm_data, lora_run, full_run, test_script, capsys, which):
    """Basic-VLM's test.sh: --base_language_model B --base_value_model V --model_weights RUN --image_path I."""
    from vlm.generate.generator import load_generator

    run = str(lora_run[0] if which == "lora" else full_run)
    prompt = "这张图片是什么颜色？<|extra_0|>"
    argv = ["--base_language_model", basic_vlm_data["llm"], "--base_value_model", basic_vlm_data["vision"],
            "--model_weights", run, "--image_path", basic_vlm_data["image"], "--prompt", prompt,
            "--max_new_tokens", "6"]
    assert test_script["main"](argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    generator = load_generator(run, model_base=basic_vlm_data["llm"] if which == "lora" else None)
    generator.settings.max_new_tokens = 6
    assert printed == generator.answer(prompt, basic_vlm_data["image"]) + "\n"
    # <|extra_0|> marks the image, as in the training data: it is the image, never text.
    image_id = generator.model.vlm_config.image_token_id
    marked = generator.prompt([{"role": "user", "content": prompt}], 1)
    assert marked == generator.prompt([{"role": "user", "content": "这张图片是什么颜色？<image>"}], 1)
    assert marked.count(image_id) == generator.num_image_tokens
    assert "extra" not in generator.tokenizer.decode([i for i in marked if i != image_id])
    # With a template that keeps the image where the text puts it (v1 moves it to the front, as LLaVA-1.5),
    # the image run sits where the marker is.
    generator.template = "chatml"
    marked = generator.prompt([{"role": "user", "content": prompt}], 1)
    assert marked == generator.prompt([{"role": "user", "content": "这张图片是什么颜色？<image>"}], 1)
    assert marked != generator.prompt([{"role": "user", "content": "<image>\n这张图片是什么颜色？"}], 1)


def test_base_language_model_that_is_not_the_full_runs_llm_is_refused(basic_vlm_data, full_run, test_script,
                                                                      tmp_path, capsys):
    other = tmp_path / "other_llm"
    from vlm.tiny import tiny_llm_config

    Qwen2ForCausalLM(tiny_llm_config("qwen2", hidden_size=32)).save_pretrained(other)
    argv = ["--base_language_model", str(other), "--model_weights", str(full_run),
            "--image_path", basic_vlm_data["image"], "--prompt", "<|extra_0|>"]
    assert test_script["main"](argv) == 2
    assert "is not the LLM of the model folder (hidden_size 64 vs 32;" in capsys.readouterr().err


@pytest.mark.parametrize("data_path_is", ["captions", "image_map"])
def test_data_check_finds_the_images_training_finds(basic_vlm_data, tmp_path, data_path_is, capsys):
    """`vlm data check` on Basic-VLM's pair without --image_folder uses the map's `path` folders, as training
    does (before: every sample `missing_image`)."""
    from vlm.cli.data import main as data_main

    report = tmp_path / "report.json"
    if data_path_is == "captions":
        flags = ["--data_path", basic_vlm_data["captions"], "--image_map", basic_vlm_data["image_map"]]
    else:
        flags = ["--data_path", basic_vlm_data["image_map"], "--captions_file", basic_vlm_data["captions"]]
    assert data_main(["check", *flags, "--report", str(report), "--num_workers", "1"]) == 0
    result = json.loads(report.read_text())
    assert result["total"] == 6 and result["kept"] == 6 and result["dropped"] == {}
    assert "'path' folders" in capsys.readouterr().out
