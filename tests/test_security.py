"""Hostile model folders (issue 10, points 6, 7, 11): each fault is planted and the behaviour asserted.

- a folder whose configs declare `auto_map` beside a `.py` that would write a marker file: refused in one line
  naming `auto_map` and --trust_remote_code, the marker never written; with the flag the code does run;
- weight index files naming shards outside the folder (`..`, absolute, a symlink out): refused naming the index
  and the shard; a Hub cache snapshot (files linked to `../../blobs`) still loads;
- a LoRA run loaded onto a base with the same shapes but other weights: refused naming both bases, accepted with
  --force-base.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2ForCausalLM

from inference_helpers import save_tiny_folder, write_image
from vlm.folders.weights import WEIGHTS_INDEX_NAME, load_state_dict, save_model_folder
from vlm.tiny import tiny_llm_config

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------
# 6. auto_map: a folder's own code


EVIL_CODE = """\
from pathlib import Path

Path({marker!r}).write_text("the folder's code ran")

from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def plant_auto_map(folder: Path, marker: Path, config_name: str = "tokenizer_config.json") -> None:
    """`auto_map` in `config_name` pointing at `evil_tok.py`, which writes `marker` when imported."""
    (folder / "evil_tok.py").write_text(EVIL_CODE.format(marker=str(marker)), encoding="utf-8")
    path = folder / config_name
    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def evil_tokenizer(tmp_path, tiny_tokenizer) -> tuple[Path, Path]:
    folder, marker = tmp_path / "evil_tok", tmp_path / "marker.txt"
    tiny_tokenizer.save_pretrained(folder)
    plant_auto_map(folder, marker)
    return folder, marker


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("model"), "siglip", "qwen2", template="chatml", seed=1)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return str(write_image(tmp_path_factory.mktemp("img") / "red.png"))


def one_line_error(err: str) -> str:
    """The one line a user mistake prints (transformers' "Loading weights" progress bars aside)."""
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_auto_map_tokenizer_is_refused_by_the_loader(evil_tokenizer):
    from vlm.hub import auto_tokenizer

    folder, marker = evil_tokenizer
    with pytest.raises(ValueError, match=r"tokenizer_config\.json has auto_map .*evil_tok\.EvilTokenizer.*"
                                         r"--trust_remote_code"):
        auto_tokenizer(folder)
    assert not marker.exists()


def test_data_check_refuses_an_auto_map_tokenizer(evil_tokenizer, write_data, data_image_folder, make_llava_record,
                                                  capsys):
    from vlm.cli import main

    folder, marker = evil_tokenizer
    data = write_data("d.json", [make_llava_record("a")])
    code = main(["data", "check", "--data_path", str(data), "--image_folder", str(data_image_folder), "--tokenizer",
                 str(folder), "--num_image_tokens", "4", "--report", str(data.parent / "r.json")])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "auto_map" in line and "--trust_remote_code" in line and str(folder) in line
    assert not marker.exists()


def test_trust_remote_code_flag_lets_the_code_run(evil_tokenizer, write_data, data_image_folder, make_llava_record,
                                                  tmp_path):
    """The flag is threaded down to transformers: with it the refusal is gone and the folder's code is imported
    (the marker appears), in a fresh process with its own module cache."""
    folder, marker = evil_tokenizer
    data = write_data("d.json", [make_llava_record("a")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "vlm", "data", "check", "--data_path", str(data), "--image_folder",
            str(data_image_folder), "--tokenizer", str(folder), "--num_image_tokens", "4",
            "--report", str(tmp_path / "r.json"), "--trust_remote_code"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "auto_map" not in done.stderr
    assert marker.read_text() == "the folder's code ran"


@pytest.mark.parametrize("config_name", ["tokenizer_config.json", "config.json", "preprocessor_config.json"])
def test_test_py_refuses_a_model_folder_with_auto_map(model_folder, image, tmp_path, capsys, config_name):
    from inference_helpers import command

    main = command("ask")
    folder, marker = tmp_path / "model", tmp_path / "marker.txt"
    shutil.copytree(model_folder, folder)
    plant_auto_map(folder, marker, config_name)
    code = main(["--model", str(folder), "--image", image, "--prompt", "What color?", "--max_new_tokens", "2"])
    line = one_line_error(capsys.readouterr().err)
    assert code != 0 and f"{config_name} has auto_map" in line and "--trust_remote_code" in line
    assert not marker.exists()


def test_trusted_model_folder_passes_the_check(model_folder, tmp_path):
    """--trust-remote-code parses and reaches load_pretrained_model: the folder is refused without it, loaded with it."""
    import argparse

    from vlm.folders.load import load_pretrained_model
    from vlm.cli.options import add_model_arguments

    folder, marker = tmp_path / "model", tmp_path / "marker.txt"
    shutil.copytree(model_folder, folder)
    plant_auto_map(folder, marker)
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert parser.parse_args(["--model", "m", "--trust-remote-code"]).trust_remote_code is True
    assert parser.parse_args(["--model", "m"]).trust_remote_code is False
    with pytest.raises(ValueError, match="tokenizer_config.json has auto_map"):
        load_pretrained_model(folder)
    assert not marker.exists()
    tokenizer, model, _, _ = load_pretrained_model(folder, trust_remote_code=True)
    assert type(tokenizer).__name__ == "EvilTokenizer" and marker.exists()
    assert model.vlm_config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_export_refuses_auto_map_and_the_flag_reaches_the_loader(model_folder, tmp_path, capsys):
    from inference_helpers import command

    main = command("export")
    folder, marker = tmp_path / "model", tmp_path / "marker.txt"
    shutil.copytree(model_folder, folder)
    plant_auto_map(folder, marker)
    assert main(["--model", str(folder), str(tmp_path / "hf")]) != 0
    assert "auto_map" in one_line_error(capsys.readouterr().err) and not marker.exists()
    assert main(["--model", str(folder), str(tmp_path / "hf"), "--trust-remote-code"]) == 0
    assert marker.exists() and (tmp_path / "hf" / "config.json").is_file()


def test_eval_and_training_refuse_auto_map(evil_tokenizer, model_folder, tmp_path, capsys):
    from inference_helpers import command
    from vlm.train.arguments import ModelArguments
    from vlm.train.model_setup import build_for_training

    folder, marker = tmp_path / "model", tmp_path / "marker.txt"
    shutil.copytree(model_folder, folder)
    plant_auto_map(folder, marker)
    assert command("eval")(["--model", str(folder), "--data_path", "x.json", "--image_folder", "."]) == 2
    assert "auto_map" in one_line_error(capsys.readouterr().err)
    llm, _ = evil_tokenizer  # an "LLM folder" whose tokenizer declares its own code
    training = SimpleNamespace(bf16=False, fp16=False, cache_dir=None)
    with pytest.raises(ValueError, match="auto_map.*--trust_remote_code"):
        build_for_training(ModelArguments(model_name_or_path=str(llm), vision_tower="v"), None, training)
    with pytest.raises(ValueError, match="auto_map.*--trust_remote_code"):
        build_for_training(ModelArguments(model_name_or_path=str(folder)), None, training)
    assert not marker.exists()


def test_every_auto_loader_in_vlm_passes_trust_remote_code():
    """Every `Auto*.from_pretrained(...)` call in the package names `trust_remote_code` (parsed, not grepped: the
    hub helpers that refuse auto_map folders are the way to load tokenizers). The count guards the parse."""
    import ast

    calls, offenders = 0, []
    for path in sorted((ROOT / "vlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("Auto")):
                continue
            calls += 1
            if not any(k.arg == "trust_remote_code" for k in node.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 8 and offenders == []


# ---------------------------------------------------------------------------------------------------------
# 7. weight index files pointing outside the folder


@pytest.fixture
def sharded_folder(model_folder, tmp_path) -> Path:
    """A copy of the tiny model saved in shards, with an index."""
    import vlm

    folder = tmp_path / "sharded"
    shutil.copytree(model_folder, folder)
    model = vlm.from_pretrained(folder)
    save_model_folder(folder, model, max_shard_size="200KB")
    assert (folder / WEIGHTS_INDEX_NAME).is_file() and not (folder / "model.safetensors").exists()
    return folder


def _redirect_first_shard(folder: Path, new_name) -> str:
    """Move the first shard out of the folder and point the index at `new_name(outside_path)`; returns the name."""
    index_path = folder / WEIGHTS_INDEX_NAME
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = folder.parent / "other" / first
    outside.parent.mkdir(exist_ok=True)
    shutil.move(folder / first, outside)
    name = new_name(outside, first)
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_pointing_outside_the_folder_is_refused(sharded_folder, image, capsys, how):
    from inference_helpers import command

    main = command("ask")
    folder = sharded_folder
    if how == "dotdot":
        shard = _redirect_first_shard(folder, lambda outside, first: f"../other/{first}")
        reason = "goes up with '..'"
    elif how == "absolute":
        shard = _redirect_first_shard(folder, lambda outside, first: str(outside))
        reason = "is an absolute path"
    else:
        shard = _redirect_first_shard(folder, lambda outside, first: first)
        os.symlink(folder.parent / "other" / shard, folder / shard)
        reason = "is a symlink that leads out of the folder"
    with pytest.raises(ValueError) as raised:
        load_state_dict(folder)
    message = str(raised.value)
    assert str(folder / WEIGHTS_INDEX_NAME) in message and repr(shard) in message and reason in message
    code = main(["--model", str(folder), "--image", image, "--prompt", "What color?", "--max_new_tokens", "2"])
    line = one_line_error(capsys.readouterr().err)
    assert code != 0 and WEIGHTS_INDEX_NAME in line and shard in line


def test_torch_index_outside_the_folder_is_refused(tmp_path):
    from vlm.folders.weights import check_weight_index

    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin\.index\.json: shard '\.\./\.\./etc/passwd' goes up"):
        check_weight_index(folder)


def test_shards_inside_the_folder_and_hub_cache_snapshots_load(sharded_folder, tmp_path):
    """What must keep working: plain shard names, and a Hub cache snapshot whose files link to ../../blobs."""
    from vlm.folders.weights import check_weight_index

    expected = load_state_dict(sharded_folder)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(sharded_folder.iterdir())):
        if path.is_file():
            shutil.copy(path, blobs / f"blob{i}")
            os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / path.name)
    check_weight_index(snapshot)
    loaded = load_state_dict(snapshot)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


# ---------------------------------------------------------------------------------------------------------
# 11. a LoRA run merged onto a base with the same shapes but other weights


def _save_llm(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_llm_config("qwen2", vocab_size=256)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """(run folder, its base, a same-shaped base with other weights, a copy of the true base elsewhere)."""
    import vlm
    from vlm.data.tokenizer import build_tokenizer
    from vlm.folders.lora import apply_lora, save_lora_run
    from vlm.tiny import tiny_vision_config

    root = tmp_path_factory.mktemp("lora")
    base, other = _save_llm(root / "base", 0), _save_llm(root / "other", 5)
    copy = root / "copy_of_base"
    shutil.copytree(base, copy)
    tokenizer = build_tokenizer(["what color is the circle? red green blue square"] * 3, vocab_size=300)
    torch.manual_seed(1)
    config = vlm.VLMConfig(vision=vlm.VisionConfig(hf_config=tiny_vision_config("siglip").to_dict()),
                           llm=vlm.LLMConfig(name_or_path=base))
    model = apply_lora(vlm.build_model(config, tokenizer=tokenizer), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    run = root / "run"
    save_lora_run(model, run, tokenizer=tokenizer)
    return str(run), base, other, str(copy)


def test_lora_run_records_its_base_fingerprint(lora_setup):
    from vlm.folders.lora import BASE_FINGERPRINT_NAME

    run, base, _, _ = lora_setup
    record = json.loads((Path(run) / BASE_FINGERPRINT_NAME).read_text())
    assert record["base"] == base and 1 <= len(record["tensors"]) <= 3
    assert all(len(t["sha256"]) == 64 and t["shape"] for t in record["tensors"].values())


def test_fingerprint_samples_stay_in_bounds_for_large_tensors():
    """More elements than float32 counts exactly (2**24): the sampled indices stay inside the tensor."""
    from vlm.folders.lora import _tensor_record

    record = _tensor_record(torch.arange(2**24 + 3, dtype=torch.float32))
    assert record["sample"][0] == 0 and record["sample"][-1] == 2**24 + 2


def test_lora_onto_a_same_shaped_other_base_is_refused_and_forced(lora_setup, capsys, tmp_path):
    from inference_helpers import command
    from vlm.folders.lora import load_lora_run, merge_lora

    main = command("merge-lora")

    run, base, other, _ = lora_setup
    with pytest.raises(ValueError) as raised:
        load_lora_run(run, model_base=other)
    message = str(raised.value)
    assert repr(base) in message and repr(other) in message and "--force-base" in message
    assert main(["--model-path", run, "--model-base", other, "--output", str(tmp_path / "refused")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert repr(base) in line and repr(other) in line and not (tmp_path / "refused").exists()

    assert main(["--model-path", run, "--model-base", other, "--output", str(tmp_path / "forced"),
                 "--force-base"]) == 0
    assert "--force-base" in capsys.readouterr().err and (tmp_path / "forced" / "config.json").is_file()
    forced = merge_lora(load_lora_run(run, model_base=other, force_base=True))
    right = merge_lora(load_lora_run(run))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(forced.state_dict()[name], right.state_dict()[name])


def test_a_reloaded_run_saved_again_keeps_its_base_fingerprint(lora_setup, tmp_path):
    """Reloaded (eval, nothing trainable) and saved again: the same fingerprint, never the run's own resized
    embeddings, so the copy still loads onto its base."""
    from vlm.folders.lora import BASE_FINGERPRINT_NAME, load_lora_run, save_lora_run

    run, _, other, _ = lora_setup
    save_lora_run(load_lora_run(run), tmp_path / "again")
    first = json.loads((Path(run) / BASE_FINGERPRINT_NAME).read_text())
    assert json.loads((tmp_path / "again" / BASE_FINGERPRINT_NAME).read_text()) == first
    assert "model.embed_tokens.weight" not in first["tensors"]
    load_lora_run(tmp_path / "again")
    with pytest.raises(ValueError, match="--force-base"):
        load_lora_run(tmp_path / "again", model_base=other)


def test_the_same_base_is_accepted_by_weights_not_by_name(lora_setup):
    """A copy of the base in another folder, and the base loaded in bfloat16, are the same base."""
    from vlm.folders.lora import load_lora_run

    run, _, _, copy = lora_setup
    load_lora_run(run, model_base=copy)
    load_lora_run(run, dtype="bfloat16")
