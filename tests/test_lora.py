"""LoRA: target selection, trainability, Trainer + checkpointing, the run folder, reload, merge, errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM, Trainer, TrainingArguments

import vlm
from vlm.folders.lora import (
    ADAPTER_CONFIG_NAME,
    NON_LORA_NAME,
    apply_lora,
    llm_linear_names,
    load_lora_run,
    merge_lora,
    save_lora_run,
)
from vlm.cli import run as run_command
from vlm.cli.merge_lora import main as merge_main
from vlm.tiny import tiny_llm_config, tiny_vision_config

MERGE_TOL = 1e-4  # fp32; measured max abs diff ~4e-7


@pytest.fixture(scope="module")
def base_llm(tmp_path_factory) -> str:
    """A tiny Qwen2 LLM folder (vocab 256), as a hub model would be."""
    folder = tmp_path_factory.mktemp("base_llm")
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_llm_config("qwen2", vocab_size=256)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer():
    from vlm.data.tokenizer import build_tokenizer

    return build_tokenizer(["what color is the circle? red green blue square"] * 3, vocab_size=300)


def make_vlm(base_llm: str, tokenizer, vision: str = "siglip"):
    torch.manual_seed(1)
    config = vlm.VLMConfig(vision=vlm.VisionConfig(hf_config=tiny_vision_config(vision).to_dict()),
                           llm=vlm.LLMConfig(name_or_path=base_llm))
    return vlm.build_model(config, tokenizer=tokenizer)  # resizes the vocabulary 256 -> len(tokenizer)


def make_lora(base_llm, tokenizer, **kwargs):
    model = apply_lora(make_vlm(base_llm, tokenizer), r=4, alpha=8, **kwargs)
    torch.manual_seed(2)
    for name, p in model.named_parameters():  # B starts at zero; make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def batch(model):
    config = model.get_base_model().vlm_config
    n = config.num_image_tokens
    ids = torch.tensor([[11, 12, 13] + [config.image_token_id] * n + [20, 21, 22],
                        [30, 31, 32] + [config.image_token_id] * n + [40, 41, 42]])
    return ids, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def logits(model, ids, pixels=None):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


# -- targets and trainability -----------------------------------------------------------------------


def test_default_targets_every_llm_linear_and_nothing_else(base_llm, tokenizer):
    base = make_vlm(base_llm, tokenizer)
    linears = set(llm_linear_names(base))
    model = apply_lora(base, r=4, alpha=8)
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
               for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == linears
    assert len(wrapped) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    projector = {n for n in trainable if ".mm_projector." in n}
    assert len(projector) == 4
    assert trainable - projector == {n for n in trainable if "lora_" in n}
    assert not any("vision_tower" in n or "lm_head" in n for n in trainable)


@pytest.mark.parametrize("targets,expected", [
    ("q_proj|v_proj", {"q_proj", "v_proj"}),
    ("self_attn\\..*", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (["gate_proj", "mlp.down_proj"], {"gate_proj", "down_proj"}),
    ("up_proj", {"up_proj"}),
])
def test_target_modules_regex_and_suffixes(base_llm, tokenizer, targets, expected):
    model = apply_lora(make_vlm(base_llm, tokenizer), r=2, alpha=4, target_modules=targets)
    kinds = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert kinds == expected
    assert not any("vision_tower" in n and "lora_" in n for n, _ in model.named_parameters())


def test_target_modules_can_pick_single_layers(base_llm, tokenizer):
    model = apply_lora(make_vlm(base_llm, tokenizer), r=2, alpha=4, target_modules=r"layers\.1\.self_attn\.q_proj")
    wrapped = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert wrapped == ["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]


def test_target_modules_that_match_nothing_list_the_names(base_llm, tokenizer):
    with pytest.raises(ValueError, match=r"'attn_qkv\|fc_in' matches none.*'q_proj'.*'up_proj'"):
        apply_lora(make_vlm(base_llm, tokenizer), r=2, alpha=4, target_modules="attn_qkv|fc_in")


def test_unfrozen_vision_tower_stays_trainable(base_llm, tokenizer):
    base = make_vlm(base_llm, tokenizer)
    base.vision_tower.set_trainable(True)
    before = {n for n, p in base.vision_tower.named_parameters() if p.requires_grad}
    model = apply_lora(base, r=2, alpha=4)
    after = {n for n, p in base.vision_tower.named_parameters() if p.requires_grad}
    assert before and after == before
    assert not any(p.requires_grad for p in base.model.embed_tokens.parameters())


def test_trainer_with_activation_checkpointing_updates_adapters_and_projector(base_llm, tokenizer, tmp_path):
    model = apply_lora(make_vlm(base_llm, tokenizer), r=4, alpha=8)
    ids, pixels = batch(model)
    rows = [{"input_ids": ids[i], "labels": ids[i], "pixel_values": pixels[i]} for i in range(2)]

    def collate(items):
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                             activation_checkpointing=True, learning_rate=1e-2, report_to=[], save_strategy="no",
                             remove_unused_columns=False, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    assert model.get_base_model().model.gradient_checkpointing
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert {n for n in changed if ".mm_projector." in n} == {n for n in before if ".mm_projector." in n}
    assert all("lora_" in n or ".mm_projector." in n for n in changed), sorted(changed)


# -- the run folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(base_llm, tokenizer, tmp_path_factory):
    """(adapter model in memory, its saved run folder)."""
    model = make_lora(base_llm, tokenizer)
    folder = tmp_path_factory.mktemp("lora_run")
    save_lora_run(model, folder, tokenizer=tokenizer)
    return model, str(folder)


def test_run_folder_layout(run, base_llm):
    model, folder = run
    files = set(os.listdir(folder))
    assert {ADAPTER_CONFIG_NAME, "adapter_model.safetensors", NON_LORA_NAME, "config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    with open(os.path.join(folder, ADAPTER_CONFIG_NAME)) as f:
        assert json.load(f)["base_model_name_or_path"] == base_llm
    non_lora = load_file(os.path.join(folder, NON_LORA_NAME))
    prefixes = {k.split(".")[0] for k in non_lora}
    assert prefixes == {"vision_tower", "mm_projector", "model"}
    # The vocabulary grew 256 -> 300 for the tokenizer's tokens: the (tied) embeddings are saved once.
    assert [k for k in non_lora if k.startswith("model.")] == ["model.embed_tokens.weight"]
    assert non_lora["model.embed_tokens.weight"].shape[0] == len(model.get_base_model().get_input_embeddings().weight)
    config = vlm.VLMConfig.load(folder)
    assert config.llm.name_or_path == base_llm and config.llm.hf_config["vocab_size"] == 300


def test_reload_gives_identical_logits(run):
    model, folder = run
    ids, pixels = batch(model)
    loaded = load_lora_run(folder)  # base from the run's llm.name_or_path
    assert isinstance(loaded, PeftModel)
    assert torch.equal(logits(model, ids, pixels), logits(loaded, ids, pixels))


def test_adapter_loads_onto_the_plain_llm(run, base_llm):
    model, folder = run
    plain = Qwen2ForCausalLM.from_pretrained(base_llm)
    plain.resize_token_embeddings(300)
    plain.get_input_embeddings().weight.data.copy_(load_file(os.path.join(folder, NON_LORA_NAME))["model.embed_tokens.weight"])
    plain = PeftModel.from_pretrained(plain, folder).eval()
    ids = torch.tensor([[11, 12, 13, 14, 20, 21]])
    assert torch.equal(logits(plain, ids), logits(model, ids))


def test_merge_equals_adapter_and_independent_formula(run):
    model, folder = run
    ids, pixels = batch(model)
    loaded = load_lora_run(folder)
    q = loaded.get_base_model().model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + (8 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    expected = expected.detach().clone()
    adapter_logits = logits(loaded, ids, pixels)
    merged = merge_lora(loaded)
    assert type(merged).__name__ == "VLMQwen2ForCausalLM"
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6)
    assert (logits(merged, ids, pixels) - adapter_logits).abs().max().item() <= MERGE_TOL


def test_merge_lora_command_writes_a_full_model_folder(run, tmp_path):
    model, folder = run
    out = tmp_path / "merged"
    assert merge_main(["--model-path", folder, "--output", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    merged = vlm.from_pretrained(out)
    saved = model.get_base_model()
    assert torch.equal(merged.mm_projector[0].weight, saved.mm_projector[0].weight)
    assert torch.equal(merged.get_input_embeddings().weight, saved.get_input_embeddings().weight)
    ids, pixels = batch(model)
    assert (logits(merged, ids, pixels) - logits(model, ids, pixels)).abs().max().item() <= MERGE_TOL


def test_vlm_folder_as_model_base(run, tokenizer, tmp_path):
    """A stage-1 style vlm folder works as the base too; its projector is replaced by the run's."""
    model, folder = run
    from vlm.folders.weights import save_model_folder

    other = make_vlm(model.get_base_model().vlm_config.llm.name_or_path, tokenizer)
    other.mm_projector[0].weight.data.zero_()
    save_model_folder(tmp_path / "stage1", other)
    loaded = load_lora_run(folder, model_base=str(tmp_path / "stage1"))
    ids, pixels = batch(model)
    assert torch.equal(logits(loaded, ids, pixels), logits(model, ids, pixels))


# -- errors -----------------------------------------------------------------------------------------


def test_base_that_does_not_match_is_named(run, tmp_path):
    _, folder = run
    wrong = tmp_path / "wrong_base"
    Qwen2ForCausalLM(tiny_llm_config("qwen2", hidden_size=32)).save_pretrained(wrong)
    with pytest.raises(ValueError, match=r"does not fit the model base .*hidden_size=64.*hidden_size=32.*--model-base"):
        load_lora_run(folder, model_base=str(wrong))
    argv = ["--model-path", folder, "--model-base", str(wrong), "--output", str(tmp_path / "o")]
    assert run_command("vlm merge-lora", merge_main, argv) == 2  # a FolderError: one line, exit 2


def test_run_without_base_or_files(run, tmp_path):
    _, folder = run
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_lora_run(tmp_path)
    config = vlm.VLMConfig.load(folder)
    config = config.replace(llm=dataclasses.replace(config.llm, name_or_path=None))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    config.save(copy)
    adapter = json.loads((copy / ADAPTER_CONFIG_NAME).read_text())
    (copy / ADAPTER_CONFIG_NAME).write_text(json.dumps({**adapter, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="records no base LLM.*--model-base"):
        load_lora_run(copy)


def test_apply_lora_needs_a_vlm(base_llm):
    with pytest.raises(TypeError, match="expects a VLM"):
        apply_lora(Qwen2ForCausalLM.from_pretrained(base_llm), r=2, alpha=4)
