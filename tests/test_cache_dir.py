"""`--cache_dir` (LLaVA's `cache_dir=training_args.cache_dir`): every Hub read that training does goes through it.

A Hugging Face cache laid out as `huggingface_hub` lays it out (`models--org--name/snapshots/<commit>/...`,
`refs/main`) is written to a folder that is not the default cache; the run is offline (`HF_HUB_OFFLINE=1`)
with the default cache (`HF_HUB_CACHE`, `HF_HOME`) pointed at an empty folder. `huggingface_hub` reads those
variables at import, so the runs happen in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from test_convert import llava_folder  # noqa: F401  (a fixture: a tiny original LLaVA-1.5 folder)
from test_start_points import add_to_hub_cache
from vlm.data.synth import generate_shapes_dataset
from vlm.tiny import save_tiny_components

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, traceback
sys.path.insert(0, sys.argv[2])  # tests/: the cache-writing helper
from test_start_points import add_to_hub_cache
from pathlib import Path
from vlm.folders.load import load_pretrained_model
from vlm.train.config import RunConfig
from vlm.train.run import run

def train_main(argv):  # the run itself: its errors propagate (python train.py prints them in one line)
    run(RunConfig.from_flags(argv))
    return 0

args = json.loads(sys.argv[1])
cache, out = args["cache"], {}

def attempt(name, call):
    try:
        out[name] = {"ok": call()}
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}

# 1. a new model from Hub ids: the LLM, its tokenizer, the tower and its image processor all come from --cache_dir
attempt("new", lambda: train_main(args["new"] + ["--cache_dir", cache]))
attempt("new_without", lambda: train_main(args["new_without"]))
# 2. the trained folder published as a Hub id, then a LoRA run started from that id
add_to_hub_cache(Path(cache), "tiny-org/vlm-tiny", Path(args["new_out"]))
attempt("from_vlm", lambda: train_main(args["from_vlm"] + ["--cache_dir", cache]))
attempt("from_vlm_without", lambda: train_main(args["from_vlm_without"]))
# 3. an original LLaVA-1.5 folder whose mm_vision_tower is a Hub id
attempt("llava", lambda: train_main(args["llava"] + ["--cache_dir", cache]))
attempt("llava_without", lambda: train_main(args["llava_without"]))
# 4. the LoRA run's recorded base is that Hub id: loading it reads the base through the same cache
attempt("load_run", lambda: load_pretrained_model(args["lora_out"], cache_dir=cache)[1].vlm_config.num_image_tokens)
attempt("load_run_without", lambda: load_pretrained_model(args["lora_out"])[1].vlm_config.num_image_tokens)
print("RESULT " + json.dumps(out))
"""


def flags(start: str, data: dict, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", start, "--data_path", str(data["train"]), "--image_folder",
            str(data["image_folder"]), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size",
            "2", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--seed", "0", *extra]


def test_training_reads_every_hub_id_through_cache_dir(tmp_path, llava_folder):  # noqa: F811
    cache, empty = tmp_path / "my_hub_cache", tmp_path / "default_cache"
    empty.mkdir()
    llm, tower = save_tiny_components(tmp_path / "components")
    add_to_hub_cache(cache, "tiny-org/llm", Path(llm))
    add_to_hub_cache(cache, "tiny-org/tower", Path(tower))
    add_to_hub_cache(cache, "tiny-org/tower-copy", Path(tower))
    llava = tmp_path / "llava-v1.5-tiny"  # the fixture's folder, its tower named by a Hub id
    shutil.copytree(llava_folder[0], llava)
    llava_config = json.loads((llava / "config.json").read_text())
    add_to_hub_cache(cache, "tiny-org/clip", Path(llava_config["mm_vision_tower"]))
    (llava / "config.json").write_text(json.dumps({**llava_config, "mm_vision_tower": "tiny-org/clip"}))
    data = generate_shapes_dataset(tmp_path / "shapes", n_train=4, n_eval=1, image_size=32, seed=0)
    new_out, lora_out = tmp_path / "new", tmp_path / "lora"
    new = flags("tiny-org/llm", data, new_out, "--vision_tower", "tiny-org/tower", "--version", "chatml")
    from_vlm = flags("tiny-org/vlm-tiny", data, lora_out, "--lora_enable", "True", "--lora_r", "4",
                     # another name for the folder's tower: accepted only when its config is read through the cache
                     "--vision_tower", "tiny-org/tower-copy")
    args = {"cache": str(cache), "new": new, "new_out": str(new_out), "lora_out": str(lora_out),
            "new_without": flags("tiny-org/llm", data, tmp_path / "no1", "--vision_tower", "tiny-org/tower",
                                 "--version", "chatml"),
            "llava": flags(str(llava), data, tmp_path / "llava_run", "--lora_enable", "True", "--lora_r", "4"),
            "llava_without": flags(str(llava), data, tmp_path / "no3", "--lora_enable", "True"),
            "from_vlm": from_vlm, "from_vlm_without": flags("tiny-org/vlm-tiny", data, tmp_path / "no2")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(empty),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args), str(ROOT / "tests")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])

    # With --cache_dir: trains and saves; the saved config names the Hub ids, never this machine's cache.
    assert out["new"] == {"ok": 0}, out["new"]
    saved = (new_out / "config.json").read_text()
    config = json.loads(saved)
    assert config["llm"]["name_or_path"] == "tiny-org/llm" and config["vision"]["name_or_path"] == "tiny-org/tower"
    assert str(cache) not in saved and "cache_dir" not in saved
    assert (new_out / "model.safetensors").is_file() and (new_out / "preprocessor_config.json").is_file()
    # Without it the default (empty) cache is read: the LLM's id is not found.
    assert "error" in out["new_without"] and "tiny-org/llm" in out["new_without"]["error"], out["new_without"]
    assert not (tmp_path / "no1" / "model.safetensors").exists()

    # A vlm model folder as a Hub id is recognised through --cache_dir (a LoRA run on it trains and records it).
    assert out["from_vlm"] == {"ok": 0}, out["from_vlm"]
    assert json.loads((lora_out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/vlm-tiny"
    assert str(cache) not in (lora_out / "config.json").read_text()
    # Saving read the base LLM's vocabulary through the cache too: unchanged embeddings are not saved again.
    assert "model.embed_tokens.weight" not in load_file(lora_out / "non_lora_trainables.safetensors")
    assert "error" in out["from_vlm_without"] and "tiny-org/vlm-tiny" in out["from_vlm_without"]["error"]

    # An original LLaVA folder's mm_vision_tower Hub id is read through --cache_dir, and only there.
    assert out["llava"] == {"ok": 0}, out["llava"]
    assert (tmp_path / "llava_run" / "adapter_model.safetensors").is_file()
    assert "error" in out["llava_without"] and "tiny-org/clip" in out["llava_without"]["error"], out["llava_without"]

    # The LoRA run's base is read through the cache given to load_pretrained_model, and only there.
    assert out["load_run"] == {"ok": config["num_image_tokens"]}, out["load_run"]
    assert "error" in out["load_run_without"] and "tiny-org/vlm-tiny" in out["load_run_without"]["error"]
