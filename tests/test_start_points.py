"""LLaVA start points: LoRA runs from an original LLaVA-1.5 or a llava-hf folder record that base (merge and
load with it, logits equal the unmerged run), Hub ids recognised by their config through an offline Hub
cache, and flags that contradict the start folder are errors naming both values."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlm
from test_convert import llava_folder, save_llava_hf  # noqa: F401  (llava_folder is a fixture)
from vlm.folders.load import load_pretrained_model
from vlm.data.synth import generate_shapes_dataset
from vlm.cli.merge_lora import main as merge_main
from vlm.folders.lora import load_lora_run
from vlm.tiny import save_tiny_components
from vlm.cli.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MERGE_TOL = 1e-4  # fp32; merging W + s*B@A reorders sums (measured ~1e-6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    data = generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_eval=2, image_size=32, seed=0)
    return {"data": str(data["train"]), "images": str(data["image_folder"])}


@pytest.fixture(scope="module")
def llava_hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_hf") / "llava-1.5-tiny-hf"
    save_llava_hf(folder, "clip", "qwen2", "default")
    return folder


def lora_flags(start, shapes, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(start), "--data_path", shapes["data"], "--image_folder", shapes["images"],
            "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "5e-2",
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--use_cpu", "True", "--save_strategy", "no", "--dataloader_num_workers", "0", "--seed", "0", *extra]


def sample_inputs(model):
    config = model.vlm_config
    ids = torch.tensor([[1, 11, 12] + [config.image_token_id] * config.num_image_tokens + [20, 21, 22]])
    return ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def check_run_from(start: Path, run: Path, tmp_path: Path) -> None:
    """The run records `start`; merge-lora with --model-base and load_pretrained_model(run, base) equal the
    unmerged adapters on the start folder's own LLM weights."""
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(start)
    _, start_model, _, _ = load_pretrained_model(start)
    unmerged = load_lora_run(run, str(start))
    inner = unmerged.get_base_model()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(inner.get_submodule(name).base_layer.weight, start_model.get_submodule(name).weight)
    assert any(p.abs().max() > 0 for n, p in unmerged.named_parameters() if "lora_B" in n)  # the adapters trained
    ids, pixels = sample_inputs(inner)
    expected = logits(unmerged, ids, pixels)
    assert (expected - logits(start_model, ids, pixels)).abs().max() > 1e-4  # the run differs from its start

    out = tmp_path / "merged"
    assert merge_main(["--model-path", str(run), "--model-base", str(start), "--output", str(out)]) == 0
    for merged in (vlm.from_pretrained(out), load_pretrained_model(run, str(start))[1],
                   load_pretrained_model(run)[1]):  # the recorded base, without --model-base
        assert (logits(merged, ids, pixels) - expected).abs().max().item() <= MERGE_TOL


def test_lora_run_from_original_llava_merges_and_loads_with_its_base(llava_folder, shapes, tmp_path):
    folder = llava_folder[0]
    run = tmp_path / "run"
    # LLaVA's own flags, equal to the folder's: accepted.
    tower = json.loads((folder / "config.json").read_text())["mm_vision_tower"]
    assert train_main(lora_flags(folder, shapes, run, "--vision_tower", tower, "--mm_projector_type", "mlp2x_gelu",
                                 "--mm_vision_select_layer", "-2")) == 0
    check_run_from(folder, run, tmp_path)


def test_lora_run_from_llava_hf_merges_and_loads_with_its_base(llava_hf_folder, shapes, tmp_path):
    run = tmp_path / "run"
    assert train_main(lora_flags(llava_hf_folder, shapes, run)) == 0
    check_run_from(llava_hf_folder, run, tmp_path)


@pytest.mark.parametrize("flag,value,message", [
    ("--mm_projector_type", "linear", "--mm_projector_type 'linear' (the folder's: 'mlp2x_gelu')"),
    ("--mm_vision_select_layer", "-1", "--mm_vision_select_layer -1 (the folder's: -2)"),
    ("--vision_tower", "SIGLIP", "the folder's: '{tower}'"),
])
def test_flags_that_contradict_the_start_folder_are_errors(llava_folder, shapes, tmp_path, flag, value, message):
    folder = llava_folder[0]
    tower = json.loads((folder / "config.json").read_text())["mm_vision_tower"]
    if value == "SIGLIP":
        _, value = save_tiny_components(tmp_path / "other", vision="siglip")
        message = f"--vision_tower {value!r} ({message.format(tower=tower)})"
    from vlm.train.config import RunConfig
    from vlm.train.run import run

    with pytest.raises(ValueError, match="is a model folder, and these flags contradict it") as info:
        run(RunConfig.from_flags(lora_flags(folder, shapes, tmp_path / "run", flag, value)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_same_tower_under_another_name_is_accepted(llava_hf_folder, tmp_path, capsys):
    """llava-hf folders record no tower name: a --vision_tower with the folder tower's architecture is it."""
    from transformers import CLIPVisionModel

    from vlm.tiny import tiny_vision_config
    from vlm.train.arguments import parse_args
    from vlm.train.model_setup import build_for_training

    copy = tmp_path / "clip-copy"
    CLIPVisionModel(tiny_vision_config("clip")).save_pretrained(copy)
    args = parse_args(["--model_name_or_path", str(llava_hf_folder), "--vision_tower", str(copy),
                       "--output_dir", str(tmp_path / "o"), "--use_cpu", "True"])
    build_for_training(*args)
    assert "has the architecture of the start folder's tower" in capsys.readouterr().out


# -- Hub ids, through an offline Hub cache laid out as huggingface_hub lays it out ---------------------


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


HUB_SCRIPT = r"""
import json, sys, torch
from vlm.folders.kinds import model_kind
from vlm.folders.load import load_pretrained_model
from vlm.cli.train import main as train_main
from vlm.cli.merge_lora import main as merge_main
args = json.loads(sys.argv[1])
def kind(repo):
    try:
        return model_kind(repo)[0]
    except Exception as exc:  # a path that is not there: one line naming it, never a silent 'llm'
        return f"{type(exc).__name__}: {exc}"
out = {"kinds": {repo: kind(repo) for repo in args["repos"]}}
_, by_id, _, _ = load_pretrained_model("tiny-org/llava-1.5-tiny-hf")
_, by_path, _, _ = load_pretrained_model(args["local"])
ids = torch.tensor([[1, 11] + [by_id.vlm_config.image_token_id] * by_id.vlm_config.num_image_tokens + [20]])
pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
with torch.no_grad():
    out["logits_diff"] = (by_id(input_ids=ids, pixel_values=pixels).logits
                          - by_path(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
out["train"] = train_main(args["train"])
out["merge"] = merge_main(["--model-path", args["run"], "--output", args["merged"]])
print("RESULT " + json.dumps(out))
"""


def test_hub_ids_are_recognised_by_their_config_offline(llava_hf_folder, llava_folder, shapes, tmp_path):
    cache = tmp_path / "hub"
    llm, _ = save_tiny_components(tmp_path / "llm")
    add_to_hub_cache(cache, "tiny-org/llava-1.5-tiny-hf", llava_hf_folder)
    add_to_hub_cache(cache, "tiny-org/llava-v1.5-tiny", llava_folder[0])
    add_to_hub_cache(cache, "tiny-org/qwen2-tiny", Path(llm))
    run, merged = tmp_path / "run", tmp_path / "merged"
    args = {"repos": ["tiny-org/llava-1.5-tiny-hf", "tiny-org/llava-v1.5-tiny", "tiny-org/qwen2-tiny",
                      "tiny-org/not-in-the-cache"],
            "local": str(llava_hf_folder), "run": str(run), "merged": str(merged),
            "train": lora_flags("tiny-org/llava-1.5-tiny-hf", shapes, run)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(cache),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    missing = out["kinds"].pop("tiny-org/not-in-the-cache")
    assert out["kinds"] == {"tiny-org/llava-1.5-tiny-hf": "llava-hf", "tiny-org/llava-v1.5-tiny": "llava",
                            "tiny-org/qwen2-tiny": "llm"}
    assert missing.startswith("MissingPathError: model path 'tiny-org/not-in-the-cache' is not a local folder"), missing
    assert out["logits_diff"] == 0.0
    assert out["train"] == 0 and out["merge"] == 0
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-org/llava-1.5-tiny-hf"
    assert (merged / "model.safetensors").is_file()
