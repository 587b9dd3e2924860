"""load_pretrained_model: vlm folders and LoRA runs, the errors users meet (missing files, wrong base, no GPU)."""

from __future__ import annotations

import dataclasses

import json
import os
import shutil

import pytest
import torch
from transformers import Qwen2ForCausalLM

import vlm
from inference_helpers import save_tiny_folder, tiny_tokenizer
from vlm.folders.kinds import folder_kind
from vlm.folders.load import load_pretrained_model
from vlm.folders.weights import save_model_folder
from vlm.folders.lora import apply_lora, save_lora_run
from vlm.tiny import tiny_llm_config, tiny_vision_config
from vlm.visual.processor import ImageProcessor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("model"), "siglip", "qwen2")


def inputs(model):
    n = model.vlm_config.num_image_tokens
    ids = torch.tensor([[11, 12] + [model.vlm_config.image_token_id] * n + [20, 21, 22]])
    return ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_vlm_folder(folder):
    tokenizer, model, processor, context_len = load_pretrained_model(folder)
    assert folder_kind(str(folder)) == "vlm"
    assert tokenizer.image_token_id == model.vlm_config.image_token_id
    assert isinstance(processor, ImageProcessor) and processor.config.image_size == 32
    assert context_len == 2048 and not model.training
    ids, pixels = inputs(model)
    assert torch.equal(logits(model, ids, pixels), logits(vlm.from_pretrained(folder), ids, pixels))


def test_dtype_override(folder):
    _, model, _, _ = load_pretrained_model(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run over a base LLM folder; returns (run folder, the adapter model, base folder)."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_llm_config("qwen2", vocab_size=len(tokenizer))).save_pretrained(root / "base")
    config = vlm.VLMConfig(vision=vlm.VisionConfig(hf_config=tiny_vision_config("siglip").to_dict()),
                           llm=vlm.LLMConfig(name_or_path=str(root / "base")))
    model = apply_lora(vlm.build_model(config, tokenizer=tokenizer), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    processor = ImageProcessor.from_vision_config(config.vision.hf_config)
    save_lora_run(model, root / "run", tokenizer=tokenizer, image_processor=processor)
    return root / "run", model.eval(), root / "base"


def test_lora_run_is_merged(lora_run):
    run, adapter, base = lora_run
    assert folder_kind(str(run)) == "lora"
    _, model, _, _ = load_pretrained_model(run, model_base=str(base))
    assert not any("lora" in name for name in model.state_dict())
    ids, pixels = inputs(model)
    assert (logits(model, ids, pixels) - logits(adapter, ids, pixels)).abs().max().item() <= 1e-4


def test_model_base_is_only_for_lora_runs(folder, lora_run):
    with pytest.raises(ValueError, match="--model-base is only used with LoRA runs.*full vlm model folder"):
        load_pretrained_model(folder, model_base=str(lora_run[2]))


def test_lora_base_that_does_not_match(lora_run, tmp_path):
    run = lora_run[0]
    Qwen2ForCausalLM(tiny_llm_config("qwen2", num_layers=3)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"num_hidden_layers=2, the base's has num_hidden_layers=3"):
        load_pretrained_model(run, model_base=str(tmp_path / "other"))


def copy_without(folder, tmp_path, *names):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    for name in names:
        os.remove(target / name)
    return target


def test_missing_files_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_model(tmp_path / "nowhere")
    broken = copy_without(folder, tmp_path, "tokenizer.json", "tokenizer_config.json")
    with pytest.raises(FileNotFoundError, match=r"missing: tokenizer.json or tokenizer_config.json or tokenizer.model\."):
        load_pretrained_model(broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"incomplete; missing: model.safetensors or model.safetensors.index.json; "
                                                r"tokenizer.json"):
        load_pretrained_model(broken)
    os.remove(broken / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json; expected a vlm model folder"):
        load_pretrained_model(broken)


def test_lora_run_missing_files_are_named(lora_run, tmp_path):
    broken = copy_without(lora_run[0], tmp_path, "non_lora_trainables.safetensors")
    with pytest.raises(FileNotFoundError, match="lora model folder .* incomplete; missing: non_lora_trainables"):
        load_pretrained_model(broken)


def test_unknown_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"none of the supported models \(model_type='bert'"):
        load_pretrained_model(tmp_path)


def test_tokenizer_of_another_model_is_refused(folder, tmp_path):
    model = vlm.from_pretrained(folder)
    model.vlm_config = model.vlm_config.replace(image_token_id=3)
    mixed = tmp_path / "mixed"
    save_model_folder(mixed, model, tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="has <image> = 9 but the model's image_token_id is 3"):
        load_pretrained_model(mixed)


@pytest.mark.parametrize("flag", ["load_4bit", "load_8bit"])
def test_quantised_loading_errors_name_the_extra(folder, flag, monkeypatch):
    """Quantised loading works on CPU (tests/test_qlora.py); without bitsandbytes the error names vlm-kit[qlora]."""
    with pytest.raises(ValueError, match="either --load-8bit or --load-4bit"):
        load_pretrained_model(folder, load_4bit=True, load_8bit=True)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ImportError, match=rf"--load-{flag[-4:]} needs the bitsandbytes package: .*vlm-kit\[qlora\]"):
        load_pretrained_model(folder, **{flag: True})


def test_processor_defaults_when_the_folder_has_none(folder, tmp_path):
    bare = copy_without(folder, tmp_path, "preprocessor_config.json")
    _, _, processor, _ = load_pretrained_model(bare)
    assert processor.config.image_size == 32 and processor.config.image_mean == (0.5, 0.5, 0.5)
