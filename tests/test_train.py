"""Training: flags as users type them, stages, parameter groups, LoRA, accumulation, DDP, atomic resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.data.synth import generate_shapes_dataset
from vlm.tiny import save_tiny_components
from vlm.cli.train import main as train_main
from vlm.errors import ConfigError
from vlm.train.arguments import DataArguments, ModelArguments, VLMTrainingArguments, parse_args
from vlm.train.config import RunConfig
from vlm.train.run import run
from vlm.train.trainer import build_param_groups

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny LLM + vision folders (stand-ins for hub ids) and a small synthetic LLaVA dataset."""
    root = tmp_path_factory.mktemp("train")
    data = generate_shapes_dataset(root / "data", n_train=24, n_eval=4, image_size=32, seed=0)
    with open(data["train"], encoding="utf-8") as f:
        records = json.load(f)
    # Variable-length replies and text-only samples, so loss normalisation and mixed batches matter.
    for i, record in enumerate(records[:12]):
        record["conversations"][1]["value"] = " ".join([record["conversations"][1]["value"]] * (1 + i % 5))
    for i in range(0, 8, 2):
        records[i] = {"id": f"text{i}", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red " * (1 + i)}]}
    with open(root / "mixed.json", "w", encoding="utf-8") as f:
        json.dump(records, f)
    texts = [turn["value"] for r in records for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"root": root, "llm": llm, "vision": vision, "data": str(root / "mixed.json"),
            "images": data["image_folder"]}


def base_flags(ws, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", ws["data"],
            "--image_folder", ws["images"], "--output_dir", str(out), "--report_to", "none",
            "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", "0", "--logging_steps", "1",
            "--save_strategy", "no", *extra]


LLAVA_LORA_FLAGS = (
    "--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 --deepspeed ./scripts/zero3.json "
    "--version v1 --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 "
    "--mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad "
    "--group_by_modality_length True --bf16 True --num_train_epochs 1 "
    "--per_device_train_batch_size 16 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 "
    "--evaluation_strategy no --save_strategy steps --save_steps 50000 --save_total_limit 1 "
    "--learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine "
    "--logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True "
    "--dataloader_num_workers 4 --lazy_preprocess True --report_to wandb"
).split()


def llava_flags(ws, out, drop: tuple[str, ...] = ()) -> list[str]:
    flags = list(LLAVA_LORA_FLAGS)
    for name in drop:
        i = flags.index(name)
        del flags[i:i + 2]
    return flags + ["--model_name_or_path", ws["llm"], "--data_path", ws["data"], "--image_folder",
                    ws["images"], "--vision_tower", ws["vision"], "--output_dir", str(out)]


def test_llava_lora_command_line_runs(workspace, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ImportError, match=r"--deepspeed .*vlm-kit\[gpu\]"):
            parse_args(llava_flags(workspace, tmp_path))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ImportError, match="--report_to wandb needs the 'wandb' package"):
            parse_args(llava_flags(workspace, tmp_path, drop=("--deepspeed",)))
    out = tmp_path / "run"
    assert train_main(llava_flags(workspace, out, drop=("--deepspeed", "--report_to"))
                      + ["--report_to", "none"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                 "config.json", "tokenizer.json", "preprocessor_config.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["template"] == "v1"  # what test.py prompts with
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 128 and adapter["lora_alpha"] == 256
    non_lora = load_file(out / "non_lora_trainables.safetensors")
    assert any(k.startswith("mm_projector.") for k in non_lora)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and {"step", "loss", "lr"} <= metrics[0].keys()


def test_basic_vlm_flags_parse(workspace, tmp_path):
    model_args, data_args, training_args = parse_args([
        "--base_language_model", workspace["llm"], "--base_value_model", workspace["vision"],
        "--lora_enable", "True", "--lora_rank", "128", "--lora_dropout", "0.10", "--feature_proj_lr", "1e-4",
        "--target_modules", "c_attn|w1|w2", "--image_map", "im.json", "--captions_file", "cap.json",
        "--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path == workspace["llm"] and model_args.vision_tower == workspace["vision"]
    assert training_args.lora_r == 128 and training_args.lora_dropout == 0.10
    assert training_args.mm_projector_lr == 1e-4 and training_args.target_modules == "c_attn|w1|w2"
    assert data_args.image_map == "im.json" and data_args.captions_file == "cap.json"


def test_bool_flags_mean_what_they_say(tmp_path):
    model_args, _, training_args = parse_args(["--lora_enable", "False", "--tune_mm_mlp_adapter", "True",
                                               "--output_dir", str(tmp_path)])
    assert training_args.lora_enable is False and model_args.tune_mm_mlp_adapter is True


def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_enable: true\nlora_r: 8\nlearning_rate: 0.001\noutput_dir: %s\n" % tmp_path)
    _, _, training_args = parse_args(["--config", str(cfg), "--lora_r", "16"])
    assert training_args.lora_enable and training_args.lora_r == 16 and training_args.learning_rate == 1e-3


def test_unknown_flag_and_qlora_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="unknown flag.*--lora_rnak"):
        parse_args(["--lora_rnak", "8", "--output_dir", str(tmp_path)])
    # QLoRA needs no GPU: bitsandbytes' CPU backend (what it trains: tests/test_qlora.py).
    _, _, training_args = parse_args(["--bits", "4", "--lora_enable", "True", "--output_dir", str(tmp_path)])
    assert training_args.bits == 4 and training_args.quant_type == "nf4" and training_args.double_quant


def test_target_modules_regex_that_matches_nothing(workspace, tmp_path):
    with pytest.raises(ValueError, match="q_proj"):  # the error lists the available linear layers
        run(RunConfig.from_flags(base_flags(workspace, tmp_path, "--lora_enable", "True", "--lora_r", "4",
                                            "--target_modules", "attn_qkv|fc_in", "--max_steps", "1")))


def test_run_config_is_typed_validated_and_read_only(tmp_path):
    import dataclasses

    training = VLMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    config = RunConfig(model=ModelArguments(model_name_or_path="llm"), data=DataArguments(data_path="d.json"),
                       training=training)
    assert config.model_dir == str(tmp_path) and config.main_process
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.model_name_or_path = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data = DataArguments()
    with pytest.raises(ConfigError, match="stage 1.*drop --lora_enable"):  # refused before any model is built
        RunConfig(model=ModelArguments(tune_mm_mlp_adapter=True), data=DataArguments(),
                  training=VLMTrainingArguments(output_dir=str(tmp_path), report_to="none", lora_enable=True))
    with pytest.raises(ConfigError, match="--lazy_preprocess False is not supported"):  # built in code, checked too
        RunConfig(model=ModelArguments(), data=DataArguments(lazy_preprocess=False), training=training)
    with pytest.raises(TypeError, match="RunConfig.data must be a DataArguments, not dict"):
        RunConfig(model=ModelArguments(), data={}, training=training)
    with pytest.raises(ConfigError, match="no --output_dir"):
        RunConfig.from_flags(["--model_name_or_path", "llm"])
    with pytest.raises(ConfigError, match="--bits 3: expected 4, 8"):
        RunConfig.from_flags(["--bits", "3", "--output_dir", str(tmp_path)])
    flags = RunConfig.from_flags(["--base_language_model", "llm", "--output_dir", str(tmp_path), "--gradient_checkpointing"])
    assert flags.model.model_name_or_path == "llm" and flags.training.gradient_checkpointing_kwargs == {
        "use_reentrant": False}  # works with frozen embeddings (LoRA, stage 1)


def test_run_returns_where_and_what_it_trained(workspace, tmp_path, capsys):
    result = run(RunConfig.from_flags(base_flags(workspace, tmp_path / "run", "--max_steps", "2",
                                                 "--per_device_train_batch_size", "2", "--version", "v1")))
    assert result.output_dir == result.model_dir == str(tmp_path / "run")
    assert (result.global_step, result.template, result.resumed_from) == (2, "v1", None)
    assert result.metrics["step"] == 2 and result.metrics["loss"] > 0 and result.train_runtime > 0
    assert (tmp_path / "run" / "config.json").is_file() and result.model is result.trainer.model


def test_stage1_from_a_folder_trained_on_another_template_says_the_switch(tmp_path, capsys):
    """README: with no --version, stage 1 trains on plain captions even from a folder trained with v1; the log
    names both templates and why (and stage 2 keeps the folder's)."""
    from types import SimpleNamespace

    from inference_helpers import save_tiny_folder
    from vlm.train.dataset import template_for

    folder = str(save_tiny_folder(tmp_path / "m", "clip", "qwen2", template="vicuna_v1"))
    stage1 = SimpleNamespace(model_name_or_path=folder, tune_mm_mlp_adapter=True)
    assert template_for(SimpleNamespace(version=None), stage1) == "plain"
    assert capsys.readouterr().out == (
        f"template: 'plain', not 'vicuna_v1' that {folder!r} was trained with, because stage 1 "
        "(--tune_mm_mlp_adapter) trains on captions (--version vicuna_v1 to keep it)\n")
    stage2 = SimpleNamespace(model_name_or_path=folder, tune_mm_mlp_adapter=False)
    assert template_for(SimpleNamespace(version=None), stage2) == "vicuna_v1"
    assert capsys.readouterr().out == f"template: 'vicuna_v1', the one {folder!r} was trained with (--version to change)\n"
    plain = str(save_tiny_folder(tmp_path / "p", "clip", "qwen2", template="plain"))
    assert template_for(SimpleNamespace(version=None), SimpleNamespace(model_name_or_path=plain,
                                                                       tune_mm_mlp_adapter=True)) == "plain"
    assert "not 'plain'" not in capsys.readouterr().out  # no switch, nothing to say


def test_param_groups_lrs_and_no_decay(workspace):
    from vlm.tiny import tiny_vlm_config
    import vlm

    model = vlm.build_model(tiny_vlm_config("clip", "llama"))
    for p in model.parameters():
        p.requires_grad_(True)
    groups = {g["name"]: g for g in build_param_groups(model, lr=1e-3, weight_decay=0.1, projector_lr=5e-3,
                                                       vision_lr=1e-4)}
    assert groups["projector"]["lr"] == 5e-3 and groups["vision"]["lr"] == 1e-4 and groups["llm"]["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups.values():
        for p in group["params"]:
            name = names[id(p)]
            no_decay = p.ndim < 2 or "bias" in name or "norm" in name
            assert (group["weight_decay"] == 0.0) == no_decay, name


def test_stage1_then_stage2_with_pretrained_projector(workspace, tmp_path):
    stage1 = tmp_path / "stage1"
    train_main(base_flags(workspace, stage1, "--tune_mm_mlp_adapter", "True", "--version", "plain",
                          "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"))
    projector = load_file(stage1 / "mm_projector.safetensors")
    assert set(projector) == {"mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight",
                              "mm_projector.2.bias"}
    # Only the projector moved in stage 1.
    import vlm
    from transformers import AutoModelForCausalLM

    trained = vlm.from_pretrained(stage1)
    base = AutoModelForCausalLM.from_pretrained(workspace["llm"])
    for name, p in base.named_parameters():
        assert torch.equal(p, trained.get_parameter(name)), name

    stage2 = tmp_path / "stage2"
    train_main(base_flags(workspace, stage2, "--pretrain_mm_mlp_adapter", str(stage1 / "mm_projector.safetensors"),
                          "--max_steps", "1", "--learning_rate", "0", "--per_device_train_batch_size", "2"))
    finetuned = vlm.from_pretrained(stage2)
    for key, value in projector.items():
        assert torch.equal(finetuned.state_dict()[key], value), key


def _final_params(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def test_gradient_accumulation_matches_large_batch(workspace, tmp_path):
    flags = ("--max_steps", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--optim", "sgd")
    train_main(base_flags(workspace, tmp_path / "b8", *flags, "--per_device_train_batch_size", "8"))
    train_main(base_flags(workspace, tmp_path / "b4x2", *flags, "--per_device_train_batch_size", "4",
                          "--gradient_accumulation_steps", "2"))
    a, b = _final_params(tmp_path / "b8"), _final_params(tmp_path / "b4x2")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # The comparison is sensitive: the same 16 samples in 4 un-accumulated updates end elsewhere.
    train_main(base_flags(workspace, tmp_path / "b4", "--max_steps", "4", "--learning_rate", "1e-2",
                          "--lr_scheduler_type", "constant", "--optim", "sgd", "--per_device_train_batch_size", "4"))
    c = _final_params(tmp_path / "b4")
    assert any(not torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-6) for k in a)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_torchrun_two_processes_equal_single_process(workspace, tmp_path):
    flags = ("--max_steps", "3", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--optim", "sgd",
             "--train_sampling_strategy", "sequential")
    # Global batch 2: with sequential order and the data's alternating text/image samples, one rank's
    # batch has no image while the other's has one.
    single = _run([sys.executable, "train.py", *base_flags(workspace, tmp_path / "one", *flags,
                                                           "--per_device_train_batch_size", "2")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                *base_flags(workspace, tmp_path / "two", *flags, "--per_device_train_batch_size", "1")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def _kill_at_first_checkpoint_then_resume(workspace, tmp_path, flags: tuple[str, ...], final_file: str) -> None:
    """Run to the end (ref/); run again (killed/), SIGKILL it as soon as a complete checkpoint exists,
    rerun the same command, which resumes. `final_file` is what only a finished run writes."""
    reference = _run([sys.executable, "train.py", *base_flags(workspace, tmp_path / "ref", *flags)])
    assert reference.returncode == 0, reference.stderr[-3000:]
    steps = flags[flags.index("--max_steps") + 1]
    kept = sorted(p.name for p in (tmp_path / "ref").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{steps}"], f"save_total_limit=1 keeps only the newest complete checkpoint: {kept}"

    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *base_flags(workspace, out, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # Kill as soon as a complete checkpoint exists (whichever: with save_total_limit=1 an early one may
    # already have been rotated away when we look), with most of the steps still to run.
    while not list(out.glob("checkpoint-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / final_file).exists(), "killed too late"
    assert list(out.glob("checkpoint-*")), "a complete checkpoint to resume from"

    resumed = _run(cmd)  # no flag: the complete checkpoint in --output_dir is found and resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert not list(out.glob(".incomplete/checkpoint-*")), "half-written checkpoints are cleared"


def _assert_files_bitwise_equal(a_folder, b_folder, name: str) -> None:
    a, b = load_file(Path(a_folder) / name), load_file(Path(b_folder) / name)
    assert a.keys() == b.keys(), name
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key}"


def test_sigkill_and_resume_is_bitwise_equal(workspace, tmp_path):
    # 30 steps (2.5 epochs, so the resume also crosses epoch boundaries), a checkpoint every 2.
    flags = ("--max_steps", "30", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
             "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1")
    _kill_at_first_checkpoint_then_resume(workspace, tmp_path, flags, "model.safetensors")
    _assert_files_bitwise_equal(tmp_path / "ref", tmp_path / "killed", "model.safetensors")


def test_lora_sigkill_and_resume_is_bitwise_equal(workspace, tmp_path):
    """The same for a LoRA run: adapter (with LoRA-trained biases) and non-LoRA trainables (projector)
    of the resumed run equal the uninterrupted run's, bit for bit. Dropout on, so RNG state matters."""
    flags = ("--max_steps", "16", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
             "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
             "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1",
             "--lora_bias", "lora_only", "--mm_projector_lr", "1e-3")
    _kill_at_first_checkpoint_then_resume(workspace, tmp_path, flags, "adapter_model.safetensors")
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        _assert_files_bitwise_equal(tmp_path / "ref", tmp_path / "killed", name)


@pytest.mark.parametrize("kind", ["vlm", "llava-hf"])
def test_training_starts_from_a_saved_model(workspace, tmp_path, kind):
    """Starting points beyond a fresh composition: a vlm model folder, a llava-hf folder."""
    sys.path.insert(0, str(Path(__file__).parent))
    from inference_helpers import tiny_model

    import vlm
    from vlm.folders.weights import save_model_folder
    from vlm.folders.llava_hf import export_llava_hf

    model, tokenizer, processor = tiny_model("siglip", "qwen2")
    start = tmp_path / "start"
    if kind == "vlm":
        save_model_folder(start, model, tokenizer=tokenizer, image_processor=processor)
    else:
        export_llava_hf(model, start, tokenizer=tokenizer, image_processor=processor, template="chatml")
    out = tmp_path / "out"
    assert train_main(["--model_name_or_path", str(start), "--data_path", workspace["data"], "--image_folder",
                       workspace["images"], "--output_dir", str(out), "--version", "chatml", "--max_steps", "2",
                       "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
                       "--use_cpu", "True", "--save_strategy", "no", "--dataloader_num_workers", "0"]) == 0
    trained = vlm.from_pretrained(out)
    before = model.state_dict()
    after = trained.state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["mm_projector.0.weight"], after["mm_projector.0.weight"])  # it trained
    assert torch.equal(before["vision_tower.model.embeddings.patch_embedding.weight"],
                       after["vision_tower.model.embeddings.patch_embedding.weight"])  # frozen tower kept


def test_basic_vlm_command_runs(workspace, tmp_path):
    """Basic-VLM's train.sh flag set, with its image_map + captions pair, trains a LoRA run."""
    records = json.loads(Path(workspace["data"]).read_text())
    images = sorted({r["image"] for r in records if "image" in r})[:6]
    (tmp_path / "image_map.json").write_text(json.dumps({str(i): name for i, name in enumerate(images)}))
    (tmp_path / "captions.json").write_text(json.dumps(
        [{"image_id": str(i), "caption": f"a picture of shapes number {i}"} for i in range(len(images))]))
    out = tmp_path / "run"
    assert train_main([
        "--base_language_model", workspace["llm"], "--base_value_model", workspace["vision"],
        "--image_map", str(tmp_path / "image_map.json"), "--captions_file", str(tmp_path / "captions.json"),
        "--image_folder", workspace["images"], "--lora_enable", "True", "--lora_rank", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.10", "--feature_proj_lr", "1e-4", "--target_modules", "q_proj|v_proj",
        "--version", "chatml", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no", "--dataloader_num_workers", "0"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_dropout"] == 0.10
    report = json.loads((out / "data_report.json").read_text())
    assert report["total"] == len(images) and report["kept"] == len(images)
