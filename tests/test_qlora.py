"""QLoRA for real, on bitsandbytes' CPU backend: `--bits 4|8` training, the run it saves, reload, merge, and
`--load-4bit/--load-8bit` inference; `--quant_type`, `--double_quant`, `--lora_bias`, `--lora_weight_path`.

References from outside vlm: bitsandbytes' own layers and quant states, transformers' own 4-bit loading of
the plain LLM (`Qwen2ForCausalLM.from_pretrained(..., quantization_config=...)`), PEFT's adapter loading,
its `merge_and_unload` on the unquantised plain LLM, and PEFT's `bias` semantics on the plain LLM.
"""

from __future__ import annotations

import dataclasses
import copy
import json
import os

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # the `vlm[qlora]` extra; installed in this environment

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import BitsAndBytesConfig, Qwen2ForCausalLM, set_seed  # noqa: E402

import vlm  # noqa: E402
from vlm.folders.load import load_pretrained_model  # noqa: E402
from vlm.data.synth import generate_shapes_dataset  # noqa: E402
from vlm.folders.lora import NON_LORA_NAME, load_lora_run  # noqa: E402
from vlm.cli.merge_lora import main as merge_main  # noqa: E402
from vlm.quantization import QUANTIZATION_RECORD, bnb_config, llm_weight_bytes, quantize_llm  # noqa: E402
from vlm.tiny import save_tiny_components, tiny_llm_config, tiny_vlm_config  # noqa: E402
from vlm.train.arguments import parse_args  # noqa: E402
from vlm.train.config import RunConfig  # noqa: E402
from vlm.train.run import run  # noqa: E402
from vlm.train.model_setup import build_for_training  # noqa: E402

# Reloading quantises the same fp32 weights again (deterministic) and runs the same kernels: measured 0.0.
RELOAD_TOL = 1e-6
# Merged fp32 weights vs PEFT's merge of the same adapter on the same base: measured ~1e-7 on logits.
MERGE_TOL = 1e-5
MEMORY_RATIO_LIMIT = 0.35


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny LLM (Qwen2, hidden 64) + SigLIP folders, and a small shapes data set (LLaVA format)."""
    root = tmp_path_factory.mktemp("qlora")
    data = generate_shapes_dataset(root / "data", n_train=8, n_eval=2, image_size=32, seed=0)
    with open(data["train"], encoding="utf-8") as f:
        texts = [turn["value"] for r in json.load(f) for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"llm": llm, "vision": vision, "data": data["train"], "images": data["image_folder"]}


def flags(ws, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", ws["data"],
            "--image_folder", ws["images"], "--output_dir", str(out), "--report_to", "none", "--version", "v1",
            "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", *extra]


def build(argv: list[str]):
    """What `python train.py <argv>` builds before training: (model, tokenizer, image processor, parsed args)."""
    model_args, data_args, training_args = parse_args(argv)
    set_seed(training_args.seed)
    model, tokenizer, processor = build_for_training(model_args, data_args, training_args)
    return model, tokenizer, processor, (model_args, data_args, training_args)


def train(argv: list[str]):
    """`python train.py <argv>` (parse, build, fit, save), keeping the trained model: (model in eval mode, folder)."""
    result = run(RunConfig.from_flags(argv))
    return result.model.eval(), result.output_dir


TRAIN_STEPS = ("--max_steps", "15", "--learning_rate", "1e-2", "--per_device_train_batch_size", "16",
               "--lr_scheduler_type", "constant", "--lora_dropout", "0")


@pytest.fixture(scope="module")
def qlora_run(workspace, tmp_path_factory):
    """A 4-bit nf4 QLoRA run through the training entry: (trained PeftModel, run folder)."""
    return train(flags(workspace, tmp_path_factory.mktemp("run4") / "out", "--bits", "4", *TRAIN_STEPS))


@pytest.fixture(scope="module")
def qlora8_run(workspace, tmp_path_factory):
    return train(flags(workspace, tmp_path_factory.mktemp("run8") / "out", "--bits", "8", *TRAIN_STEPS))


def adapted_layers(base) -> dict:
    """The LLM's layers PEFT wrapped, by name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def losses(folder: str) -> list[float]:
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def inputs(model):
    config = model.vlm_config
    n = config.num_image_tokens
    ids = torch.tensor([[3, 4, 5] + [config.image_token_id] * n + [20, 21, 22],
                        [30, 31, 32] + [config.image_token_id] * n + [40, 41, 42]])
    return ids, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def logits(model, ids, pixels=None):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def plain_llm_with_run_embeddings(llm_folder: str, run: str, **from_pretrained_kwargs):
    """The plain transformers Qwen2 (no vlm code), with the run's embeddings if it saved resized ones."""
    plain = Qwen2ForCausalLM.from_pretrained(llm_folder, **from_pretrained_kwargs)
    embeddings = load_file(os.path.join(run, NON_LORA_NAME)).get("model.embed_tokens.weight")
    if embeddings is not None:
        plain.resize_token_embeddings(embeddings.shape[0])
        plain.get_input_embeddings().weight.data.copy_(embeddings)
    return plain


# -- the quantised model ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits,layer,weight_dtype", [(4, "Linear4bit", torch.uint8), (8, "Linear8bitLt", torch.int8)])
def test_llm_linears_are_bitsandbytes_layers_tower_and_projector_are_not(request, bits, layer, weight_dtype):
    model, _ = request.getfixturevalue("qlora_run" if bits == 4 else "qlora8_run")
    base = model.get_base_model()
    adapted = adapted_layers(base)
    assert len(adapted) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    for name, wrapper in adapted.items():
        assert type(wrapper).__module__ == "peft.tuners.lora.bnb", name  # PEFT's bnb LoRA layer
        module = wrapper.get_base_layer()
        assert type(module) is getattr(bnb.nn, layer), name
        assert module.weight.dtype == weight_dtype and not module.weight.requires_grad
    assert sum(type(m) is getattr(bnb.nn, layer) for m in base.modules()) == 14
    for part in (base.vision_tower, base.mm_projector, base.lm_head, base.model.embed_tokens):
        modules = list(part.modules())
        assert not any(type(m).__module__.startswith("bitsandbytes") for m in modules)
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in base.mm_projector.parameters())
    assert not any(p.requires_grad for p in base.vision_tower.parameters())


@pytest.mark.parametrize("run", ["qlora_run", "qlora8_run"])
def test_loss_falls(request, run):
    _, folder = request.getfixturevalue(run)
    values = losses(folder)
    assert len(values) == 15
    first, last = sum(values[:2]) / 2, sum(values[-2:]) / 2
    print(f"{run}: loss {first:.3f} -> {last:.3f} over 15 steps")
    assert last < 0.9 * first, values


def test_llm_weight_memory_under_4bit():
    """LLM weight bytes (incl. the 4-bit quant states) vs fp32, on a Qwen2 with hidden 128 / intermediate 384.

    Embeddings (tied lm_head) stay fp32, so the ratio depends on their share: here 9% of the LLM's
    parameters (at hidden 64 with a 300-token vocabulary, 21%, the ratio is 0.354).
    """
    config = tiny_vlm_config("siglip", "qwen2", vocab_size=320)
    config = config.replace(llm=dataclasses.replace(config.llm, hf_config=tiny_llm_config(
        "qwen2", vocab_size=320, hidden_size=128).to_dict() | {"intermediate_size": 384}))
    torch.manual_seed(0)
    model = vlm.build_model(config)
    fp32 = llm_weight_bytes(model)
    ratios = {}
    for name, qconfig in {"nf4+double_quant": bnb_config(4), "nf4": bnb_config(4, double_quant=False),
                          "int8": bnb_config(8)}.items():
        ratios[name] = llm_weight_bytes(quantize_llm(copy.deepcopy(model), qconfig)) / fp32
    print(f"LLM weight bytes vs fp32 ({fp32} B): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    assert ratios["nf4+double_quant"] < MEMORY_RATIO_LIMIT and ratios["nf4"] < MEMORY_RATIO_LIMIT
    assert ratios["nf4+double_quant"] < ratios["nf4"] < ratios["int8"] < 0.5


# -- the saved run ----------------------------------------------------------------------------------


def test_saved_run_is_a_standard_peft_adapter(qlora_run, workspace):
    model, folder = qlora_run
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", NON_LORA_NAME, QUANTIZATION_RECORD} <= files
    assert "model.safetensors" not in files
    non_lora = load_file(os.path.join(folder, NON_LORA_NAME))
    assert {k.split(".")[0] for k in non_lora} == {"vision_tower", "mm_projector"}  # the tokenizer had <image>
    trained = model.get_base_model().mm_projector.state_dict()
    assert all(torch.equal(non_lora[f"mm_projector.{k}"], v) for k, v in trained.items())
    config = vlm.VLMConfig.load(folder)
    assert "quantization_config" not in config.llm.hf_config  # the run describes the fp architecture
    with open(os.path.join(folder, QUANTIZATION_RECORD), encoding="utf-8") as f:
        record = json.load(f)
    assert record["load_in_4bit"] and record["bnb_4bit_quant_type"] == "nf4" and record["bnb_4bit_use_double_quant"]
    # Outside reference: transformers' own 4-bit load of the plain LLM + PEFT's adapter loader.
    plain = plain_llm_with_run_embeddings(workspace["llm"], folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    plain = PeftModel.from_pretrained(plain, folder).eval()
    ids = torch.tensor([[3, 4, 5, 6, 20, 21, 22]])
    diff = (logits(plain, ids) - logits(model, ids)).abs().max().item()
    assert diff <= RELOAD_TOL, diff


def test_reload_gives_equal_logits(qlora_run):
    model, folder = qlora_run
    ids, pixels = inputs(model)
    expected = logits(model, ids, pixels)
    _, loaded, _, _ = load_pretrained_model(folder, load_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    diff = (logits(loaded, ids, pixels) - expected).abs().max().item()
    print(f"QLoRA reload max |logit diff| = {diff:.2e}")
    assert diff <= RELOAD_TOL
    # Reloaded without quantisation (merged on the fp32 base) the model is close but not equal: the
    # adapter was trained against the 4-bit weights, which is why the quantised reload exists.
    _, merged, _, _ = load_pretrained_model(folder)
    assert (logits(merged, ids, pixels) - expected).abs().max().item() > 1e-3


def test_merge_lora_onto_the_unquantised_base(qlora_run, workspace, tmp_path):
    model, folder = qlora_run
    out = tmp_path / "merged"
    assert merge_main(["--model-path", folder, "--output", str(out)]) == 0
    merged = vlm.from_pretrained(out)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    # Outside reference: PEFT's own merge of the adapter on the plain, unquantised transformers LLM.
    reference = PeftModel.from_pretrained(plain_llm_with_run_embeddings(workspace["llm"], folder), folder)
    reference = reference.merge_and_unload().eval()
    ids = torch.tensor([[3, 4, 5, 6, 20, 21, 22]])
    diff = (logits(merged, ids) - logits(reference, ids)).abs().max().item()
    assert diff <= MERGE_TOL, diff
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q_merged, reference.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=1e-6)
    # ... and not onto the 4-bit approximation of the base.
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    dequantized = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (q_merged - (dequantized + delta)).abs().max().item() > 1e-3
    # The projector merged is the trained one.
    assert torch.equal(merged.mm_projector[0].weight, model.get_base_model().mm_projector[0].weight)


# -- quantisation flags -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra,quant_type,nested,compute", [
    ((), "nf4", True, torch.float32),
    (("--quant_type", "fp4"), "fp4", True, torch.float32),
    (("--double_quant", "False"), "nf4", False, torch.float32),
    (("--quant_type", "fp4", "--double_quant", "False", "--bf16", "True"), "fp4", False, torch.bfloat16),
])
def test_quant_type_double_quant_and_compute_dtype_reach_bitsandbytes(workspace, tmp_path, extra, quant_type,
                                                                      nested, compute):
    model, *_ = build(flags(workspace, tmp_path, "--bits", "4", *extra))
    base = model.get_base_model()
    layers = [module.get_base_layer() for module in adapted_layers(base).values()]
    assert len(layers) == 14
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == quant_type and state.nested is nested and layer.compute_dtype == compute
    # bitsandbytes' own quantiser with the same settings on the run's weights (bf16 with --bf16) gives the
    # same packed weights.
    fp = Qwen2ForCausalLM.from_pretrained(workspace["llm"]).model.layers[0].mlp.up_proj.weight
    packed, _ = bnb.functional.quantize_4bit(fp.data.to(compute), quant_type=quant_type, compress_statistics=nested)
    assert torch.equal(base.model.layers[0].mlp.up_proj.base_layer.weight.data, packed)


def test_bits_flag_errors(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"--bits 4 quantises the LLM.*--lora_enable True"):
        parse_args(["--bits", "4", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--bits 6: expected 4, 8"):
        parse_args(["--bits", "6", "--lora_enable", "True", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--quant_type 'int4'"):
        parse_args(["--bits", "4", "--quant_type", "int4", "--lora_enable", "True", "--output_dir", str(tmp_path)])


# -- LoRA flags -------------------------------------------------------------------------------------


def trainable_llm_biases(model) -> set[str]:
    return {n.replace("base_model.model.", "").replace(".base_layer", "") for n, p in model.named_parameters()
            if p.requires_grad and n.endswith("bias") and "vision_tower" not in n and "mm_projector" not in n}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_bias_trains_the_biases_peft_would(workspace, tmp_path, bias):
    model, tokenizer, processor, _ = build(flags(workspace, tmp_path, "--bits", "4", "--lora_bias", bias,
                                                 "--target_modules", "q_proj|o_proj"))
    # Outside reference: PEFT with the same bias mode on the plain transformers LLM.
    plain = get_peft_model(Qwen2ForCausalLM.from_pretrained(workspace["llm"]),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], bias=bias))
    expected = trainable_llm_biases(plain)
    assert trainable_llm_biases(model) == expected
    assert len(expected) == {"none": 0, "all": 2 * 3, "lora_only": 2}[bias]  # Qwen2: q, k, v have biases
    assert not any(p.requires_grad for p in model.get_base_model().vision_tower.parameters())
    folder = tmp_path / "saved"
    from vlm.folders.lora import save_lora_run

    save_lora_run(model, folder, tokenizer=tokenizer)
    saved_llm_biases = {k for k in load_file(folder / "adapter_model.safetensors")
                        if k.endswith("bias") and "vision_tower" not in k and "mm_projector" not in k}
    assert len(saved_llm_biases) == len(expected)


def test_lora_bias_all_biases_change_in_training(workspace, tmp_path):
    model, folder = train(flags(workspace, tmp_path / "out", "--bits", "4", "--lora_bias", "all",
                                "--max_steps", "2", "--learning_rate", "1e-2"))
    base_llm = Qwen2ForCausalLM.from_pretrained(workspace["llm"])
    trained = model.get_base_model().model.layers[0].self_attn.k_proj.base_layer.bias
    assert not torch.equal(trained, base_llm.model.layers[0].self_attn.k_proj.bias)
    reloaded = load_lora_run(folder, quantization=bnb_config(4))
    assert torch.equal(reloaded.get_base_model().model.layers[0].self_attn.k_proj.base_layer.bias, trained)


def test_lora_weight_path_initialises_the_adapter(qlora_run, workspace, tmp_path):
    trained, folder = qlora_run
    fresh, *_ = build(flags(workspace, tmp_path, "--bits", "4"))
    started, *_ = build(flags(workspace, tmp_path, "--bits", "4", "--lora_weight_path", folder))
    adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert not fresh.state_dict()[name].any()  # PEFT starts B at zero
    state = started.state_dict()
    for key, value in adapter.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key
    with pytest.raises(ValueError, match=r"lora_weight_path.*does not match the model.*shape mismatch.*--lora_r"):
        build(flags(workspace, tmp_path, "--bits", "4", "--lora_r", "4", "--lora_weight_path", folder))
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        build(flags(workspace, tmp_path, "--lora_weight_path", str(tmp_path)))


# -- inference --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,layer", [("load_4bit", "Linear4bit"), ("load_8bit", "Linear8bitLt")])
def test_quantised_inference_on_cpu_answers(qlora_run, flag, layer):
    from inference_helpers import save_tiny_folder, write_image
    from vlm.generate.decoding import GenerationSettings
    from vlm.generate.generator import load_generator

    _, run = qlora_run
    root = os.path.dirname(run)
    folder = save_tiny_folder(os.path.join(root, f"model_{flag}"), "siglip", "qwen2", template="chatml", seed=1)
    _, full, _, _ = load_pretrained_model(folder)
    _, model, _, _ = load_pretrained_model(folder, **{flag: True})
    assert sum(type(m) is getattr(bnb.nn, layer) for m in model.modules()) == 14
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.vision_tower.modules())
    ids, pixels = inputs(model)
    diff = (logits(model, ids, pixels) - logits(full, ids, pixels)).abs()
    assert 0 < diff.max().item() < 0.5 * logits(full, ids, pixels).abs().max().item()
    image = str(write_image(os.path.join(root, f"{flag}.png")))
    for path in (folder, run):  # a vlm folder and the QLoRA run
        generator = load_generator(str(path), settings=GenerationSettings(max_new_tokens=4), **{flag: True})
        answer = generator.answer("What color is the circle?", image)
        assert isinstance(answer, str)
