"""Model folders (`vlm.folders`): every kind through every public loader, one strict path, one way to fail.

Kinds: a vlm model folder, a vlm LoRA run (its base a vlm folder), an original LLaVA-1.5 folder and a llava-hf
folder. Loaders: `vlm.from_pretrained` (vlm folders), `vlm.load_pretrained_model`, `vlm.load`, `vlm merge-lora`
(LoRA runs) and `vlm export` (its source). A folder with one weight missing fails in each of them with the same
class, `FolderError`, naming the weights file and the key. The config is read-only; the chat template lives in
config.json, and folders saved before that (template in `vlm_generation.json`) still load with theirs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlm
from inference_helpers import command, save_tiny_folder
from test_convert import llava_folder, save_llava_hf  # noqa: F401  (llava_folder is a fixture)
from vlm.config import VLMConfig
from vlm.errors import ConfigError, FolderError, MissingPathError
from vlm.folders.export import export
from vlm.folders.kinds import folder_template, model_kind
from vlm.folders.lora import NON_LORA_NAME, apply_lora, merge_lora_run, save_lora_run
from vlm.folders.weights import WEIGHTS_NAME

KINDS = ("vlm", "lora", "llava", "llava-hf")
MISSING = "mm_projector.0.weight"  # the key every damaged copy lacks, in vlm's layout


@pytest.fixture(scope="module")
def folders(tmp_path_factory, llava_folder):  # noqa: F811
    root = tmp_path_factory.mktemp("folders")
    base = save_tiny_folder(root / "vlm", template="chatml")
    model = vlm.from_pretrained(base)
    model.vlm_config = model.vlm_config.replace(template="chatml")
    peft = apply_lora(model, r=2, alpha=4, base=str(base))
    with torch.no_grad():  # PEFT starts B at zero: make the adapters change the model
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    processor = vlm.load(base)[1]
    save_lora_run(peft, root / "lora", tokenizer=processor.tokenizer, image_processor=processor.image_processor)
    hf = root / "llava-hf"
    save_llava_hf(hf, "clip", "qwen2", "default")
    return {"vlm": base, "lora": root / "lora", "llava": llava_folder[0], "llava-hf": hf}


def sample_logits(model) -> torch.Tensor:
    config = model.vlm_config
    ids = torch.tensor([[1, 11, 12] + [config.image_token_id] * config.num_image_tokens + [20, 21]])
    size = model.vision_tower.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_loads_the_same_model_through_every_loader(folders, kind, tmp_path):
    folder = folders[kind]
    assert model_kind(folder) == (kind, str(folder))
    _, model, _, _ = vlm.load_pretrained_model(folder)
    reference = sample_logits(model)
    loaded = {"vlm.load": vlm.load(folder)[0]}
    if kind == "vlm":
        loaded["vlm.from_pretrained"] = vlm.from_pretrained(folder)
    else:
        with pytest.raises(FolderError, match=rf"is a {kind} folder, not a vlm model folder; .*load_pretrained_model"):
            vlm.from_pretrained(folder)
    if kind == "lora":
        loaded["vlm merge-lora"] = merge_lora_run(folder, tmp_path / "merged")
        loaded["merged folder"] = vlm.from_pretrained(tmp_path / "merged")
    export(folder, tmp_path / "exported", format="llava-hf")  # the export source goes through the same loader
    loaded["vlm export"] = vlm.load_pretrained_model(tmp_path / "exported")[1]
    for name, other in loaded.items():
        assert torch.equal(sample_logits(other), reference), name


def without(path: Path, key: str) -> None:
    """Rewrite the safetensors or torch file at `path` without `key`."""
    if path.suffix == ".safetensors":
        state = load_file(path)
        assert key in state, sorted(state)[:5]
        del state[key]
        save_file(state, path, metadata={"format": "pt"})
    else:
        state = torch.load(path, weights_only=True)
        del state[key]
        torch.save(state, path)


@pytest.fixture(scope="module")
def damaged(folders, tmp_path_factory):
    """Each kind with the projector's first weight removed from the file that holds it."""
    root = tmp_path_factory.mktemp("damaged")
    files = {"vlm": (WEIGHTS_NAME, MISSING), "lora": (NON_LORA_NAME, MISSING),
             "llava": ("pytorch_model.bin", "model." + MISSING),
             "llava-hf": (WEIGHTS_NAME, "multi_modal_projector.linear_1.weight")}
    out = {}
    for kind, (name, key) in files.items():
        copy = root / kind
        shutil.copytree(folders[kind], copy)
        without(copy / name, key)
        out[kind] = (copy, str(copy / name))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_key_fails_the_same_way_everywhere(damaged, kind, tmp_path, capsys):
    folder, weights = damaged[kind]
    loaders = {"load_pretrained_model": lambda: vlm.load_pretrained_model(folder),
               "vlm.load": lambda: vlm.load(folder),
               "export": lambda: export(folder, tmp_path / "out", format="llava-hf")}
    if kind == "vlm":
        loaders["vlm.from_pretrained"] = lambda: vlm.from_pretrained(folder)
    if kind == "lora":
        loaders["merge-lora"] = lambda: merge_lora_run(folder, tmp_path / "merged")
    messages = set()
    for name, load in loaders.items():
        with pytest.raises(FolderError) as error:
            load()
        message = str(error.value)
        assert weights in message and f"1 missing key(s) [{MISSING}]" in message, (name, message)
        messages.add(message)
    assert len(messages) == 1, messages  # word for word the same
    # the commands: that line, exit 2
    argv = (["--model-path", str(folder), "--output", str(tmp_path / "m")] if kind == "lora"
            else ["--format", "llava-hf", "--model", str(folder), str(tmp_path / "e")])
    assert command("merge-lora" if kind == "lora" else "export")(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(messages.pop()) and ": error: " in err[-1], err


def test_a_damaged_vlm_folder_is_never_a_plain_llm(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["vlm"], broken)
    (broken / "config.json").write_text('{"vision": {')
    with pytest.raises(ConfigError, match=rf"{broken / 'config.json'} is not valid JSON"):
        model_kind(broken)
    data = json.loads((folders["vlm"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "llm"}))
    assert model_kind(broken)[0] == "vlm"
    for load in (vlm.from_pretrained, vlm.load_pretrained_model):
        with pytest.raises(FolderError, match=r"config.json is not a complete vlm model config \(no 'llm' section\)"):
            load(broken)
    (broken / "config.json").unlink()
    with pytest.raises(MissingPathError, match="has no config.json"):
        model_kind(broken)


def test_a_missing_path_is_named_not_downloaded(tmp_path, monkeypatch):
    import vlm.folders.kinds as kinds

    monkeypatch.setattr(kinds, "_hub_file", lambda *a, **k: None)  # neither in the cache nor downloadable
    for path in ("nobody/no-such-model", str(tmp_path / "no" / "such" / "folder")):
        with pytest.raises(MissingPathError, match=re_escape(repr(path))):
            model_kind(path)
        with pytest.raises(MissingPathError, match=re_escape(repr(path))):
            vlm.load_pretrained_model(path)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_config_is_read_only(folders):
    config = VLMConfig.load(folders["vlm"])
    for target, field, value in ((config, "dtype", "bfloat16"), (config, "template", "plain"),
                                 (config.vision, "select_layer", -1), (config.projector, "type", "linear"),
                                 (config.llm, "name_or_path", "x")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, field, value)
    assert config.replace(template="plain").template == "plain" and config.template == "chatml"
    with pytest.raises(ConfigError, match=r"^dtype='float8'; expected one of"):
        config.replace(dtype="float8")
    with pytest.raises(ConfigError, match=r"^template='vicuna_v9' is not a chat template; valid names: chatml"):
        config.replace(template="vicuna_v9")
    model = vlm.from_pretrained(folders["vlm"], dtype="bfloat16")  # a loader never writes into a config it reads
    assert model.vlm_config.dtype == "bfloat16" and VLMConfig.load(folders["vlm"]).dtype == "float32"


def test_unknown_aspect_mode_is_one_line_listing_the_choices(folders):
    from vlm.train.model_setup import with_aspect_ratio

    processor = vlm.load(folders["vlm"])[1].image_processor
    with pytest.raises(ConfigError) as error:
        with_aspect_ratio(processor, "anyres")
    assert str(error.value) == "--image_aspect_ratio 'anyres' is not supported; choose one of pad, resize, crop"
    cropped = with_aspect_ratio(processor, "crop")
    assert cropped.config.aspect_ratio == "crop" and processor.config.aspect_ratio == "pad"
    config = VLMConfig.load(folders["vlm"])
    with pytest.raises(ConfigError, match=r"^image_aspect_ratio='anyres' is not supported; choose one of pad, resize, crop$"):
        config.replace(image_aspect_ratio="anyres")


def test_the_aspect_mode_training_used_is_in_config_json(folders, tmp_path):
    """config.json's image_aspect_ratio (what training used) decides the loaded processor's mode; LLaVA-1.5's
    `image_aspect_ratio: pad` becomes it."""
    assert vlm.load(folders["vlm"])[1].image_processor.config.aspect_ratio == "pad"  # the folder's processor
    cropped = tmp_path / "cropped"
    shutil.copytree(folders["vlm"], cropped)
    VLMConfig.load(cropped).replace(image_aspect_ratio="crop").save(cropped)
    model, processor = vlm.load(cropped)
    assert processor.image_processor.config.aspect_ratio == "crop" and model.vlm_config.image_aspect_ratio == "crop"
    assert vlm.load_pretrained_model(folders["llava"])[1].vlm_config.image_aspect_ratio == "pad"


def test_template_is_in_config_json_and_old_folders_keep_theirs(folders, tmp_path):
    assert json.loads((folders["vlm"] / "config.json").read_text())["template"] == "chatml"
    assert json.loads((folders["lora"] / "config.json").read_text())["template"] == "chatml"
    assert not (folders["vlm"] / "vlm_generation.json").exists()
    # a folder saved before VLMConfig.template: no "template" key, vlm_generation.json beside it
    old = tmp_path / "old"
    shutil.copytree(folders["vlm"], old)
    data = json.loads((old / "config.json").read_text())
    del data["template"]
    (old / "config.json").write_text(json.dumps(data))
    (old / "vlm_generation.json").write_text(json.dumps({"template": "vicuna_v1"}))
    assert folder_template(old) == "vicuna_v1"
    assert vlm.from_pretrained(old).vlm_config.template == "vicuna_v1"
    assert vlm.load(old)[1].template == "vicuna_v1"
    assert torch.equal(sample_logits(vlm.from_pretrained(old)), sample_logits(vlm.from_pretrained(folders["vlm"])))
    # config.json's template wins over a stale legacy file
    shutil.copy(old / "vlm_generation.json", tmp_path / "stale.json")
    stale = tmp_path / "stale"
    shutil.copytree(folders["vlm"], stale)
    shutil.copy(tmp_path / "stale.json", stale / "vlm_generation.json")
    assert folder_template(stale) == "chatml"


def test_a_plain_llm_folder_is_an_llm_not_a_vlm(tmp_path):
    from vlm.tiny import save_tiny_components

    llm, _ = save_tiny_components(tmp_path)
    assert model_kind(llm) == ("llm", llm)  # a start point of training or a LoRA base (tests/test_lora.py)
    for load in (vlm.from_pretrained, vlm.load_pretrained_model):
        with pytest.raises(FolderError, match=r"config.json describes none of the supported models \(model_type='qwen2'"):
            load(llm)


# Loading fills the skeleton one tensor at a time from the memory-mapped file (issue 12, point 7): the peak is the
# model's size, not the model plus a second full copy of the weights.

_LOAD_PEAK = r"""
import gc, sys, threading, time
import torch
from vlm.folders.build import from_pretrained

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

from_pretrained(sys.argv[1])  # a small folder first: every module a load imports is imported before measuring
gc.collect()
before = peak = rss()
done = threading.Event()
def sample():
    global peak
    while not done.wait(0.002):
        peak = max(peak, rss())
thread = threading.Thread(target=sample, daemon=True)
thread.start()
model = from_pretrained(sys.argv[2])
for tensor in [*model.parameters(), *model.buffers()]:  # a mapped weight is resident only once read
    float(tensor.sum())
done.set(); thread.join()
peak = max(peak, rss())
size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values())
print("RATIO", (peak - before) / size, size)
"""


def _save_big_folder(folder: Path, vocab_size: int, tied: bool = False) -> Path:
    """A vlm folder of a tiny model whose vocabulary makes it ~vocab_size * 64 * 8 bytes (untied embeddings)."""
    from vlm.folders.weights import save_model
    from vlm.model import build_model
    from vlm.tiny import tiny_vlm_config

    config = tiny_vlm_config(vocab_size=vocab_size)
    config = config.replace(llm=dataclasses.replace(config.llm, hf_config={**config.llm.hf_config,
                                                                           "tie_word_embeddings": tied}))
    torch.manual_seed(0)
    save_model(build_model(config), folder)
    return folder


def test_a_folder_loads_without_a_second_copy_of_its_weights(tmp_path):
    import os
    import subprocess
    import sys

    small = _save_big_folder(tmp_path / "small", 256)
    big = _save_big_folder(tmp_path / "big", 200_000)  # ~100 MB: the import noise of a load is a few MB
    done = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(small), str(big)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ratio, size = (float(x) for x in done.stdout.split("RATIO")[1].split())
    assert size > 100e6, size
    # reading the whole file and copying it into the model (the loader before issue 12) measured 2.0x here
    assert ratio < 1.2, f"load peak {ratio:.2f}x the model's {size / 1e6:.0f} MB"


def test_loaded_weights_equal_the_file_tied_converted_and_safe_to_save_over(folders, tmp_path):
    from vlm.folders.llava_hf import load_llava_hf
    from vlm.folders.weights import lazy_state_dict, save_model

    folder = tmp_path / "vlm"
    shutil.copytree(folders["vlm"], folder)
    saved = load_file(folder / WEIGHTS_NAME)
    model = vlm.from_pretrained(folder)
    state = model.state_dict()
    assert saved.keys() <= state.keys()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert not model.vlm_config.llm.hf_config["tie_word_embeddings"]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tied = vlm.from_pretrained(_save_big_folder(tmp_path / "tied", 256, tied=True))  # tied: saved once, one tensor
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / WEIGHTS_NAME)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert torch.equal(tied.lm_head.weight, load_file(tmp_path / "tied" / WEIGHTS_NAME)["model.embed_tokens.weight"])
    frozen = {name for name, p in vlm.from_pretrained(folders["vlm"]).named_parameters() if not p.requires_grad}
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen
    # the loaded tensors map the file: saving changed weights over the same folder leaves the model as it was
    with torch.no_grad():
        model.mm_projector[0].weight.add_(1.0)
    expected = model.mm_projector[0].weight.clone()
    save_model(model, folder)
    assert torch.equal(model.mm_projector[0].weight, expected)
    assert torch.equal(vlm.from_pretrained(folder).mm_projector[0].weight, expected)
    assert torch.equal(load_file(folder / WEIGHTS_NAME)["mm_projector.0.weight"], expected)
    # the file is read lazily: headers only until a tensor's turn
    lazy = lazy_state_dict(folder)
    assert {k: (v.shape, v.dtype) for k, v in lazy.items()} == {k: (v.shape, v.dtype) for k, v in saved.items()}
    # a skeleton of another dtype converts each tensor as it is read (llava-hf folder: float32 file, bfloat16 model)
    hf = load_llava_hf(folders["llava-hf"], dtype="bfloat16")
    ref = load_llava_hf(folders["llava-hf"])
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    for (name, p), q in zip(hf.named_parameters(), ref.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), name
