"""Interchange: key tables both ways, llava-hf in (parity), original LLaVA-1.5 in (parity), llava-hf out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from inference_helpers import CORPUS, command, save_tiny_folder, tiny_model, tiny_tokenizer, write_image
from vlm.folders.load import load_pretrained_model
from vlm.cli.export import main as export_main
from vlm.folders.export import export
from vlm.folders.keymap import (
    LLAVA_HF_TO_VLM,
    LLAVA_ORIGINAL_TO_VLM,
    VLM_TO_LLAVA_HF,
    VLM_TO_LLAVA_ORIGINAL,
    rename_keys,
)
from vlm.generate.decoding import GenerationSettings, generate_ids
from vlm.generate.generator import load_generator
from vlm.tiny import tiny_llm_config, tiny_vision_config

PARITY_TOL = 1e-5  # fp32; measured max abs diff 0.0 for every case below


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# -- key tables -------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward,backward", [(VLM_TO_LLAVA_ORIGINAL, LLAVA_ORIGINAL_TO_VLM),
                                              (VLM_TO_LLAVA_HF, LLAVA_HF_TO_VLM)])
def test_key_tables_round_trip(forward, backward):
    model, _, _ = tiny_model("clip", "llama")
    state = model.state_dict()
    there = rename_keys(state, forward)
    assert len(there) == len(state) and not set(there) & {k for k in state if k.startswith("mm_projector")}
    assert rename_keys(there, backward) .keys() == state.keys()


def test_unmapped_keys_are_an_error():
    with pytest.raises(ValueError, match=r"1 key\(s\) of the checkpoint have no mapping: \['stray.weight'\]"):
        rename_keys({"stray.weight": torch.zeros(1)}, LLAVA_ORIGINAL_TO_VLM)


# -- llava-hf in ------------------------------------------------------------------------------------


def save_llava_hf(folder: Path, vision: str, llm: str, strategy: str) -> LlavaForConditionalGeneration:
    tokenizer = tiny_tokenizer()
    config = LlavaConfig(vision_config=tiny_vision_config(vision), text_config=tiny_llm_config(llm, vocab_size=len(tokenizer)),
                         image_token_index=tokenizer.image_token_id, vision_feature_select_strategy=strategy,
                         image_seq_length=16 + (strategy == "full" and vision == "clip"))
    torch.manual_seed(0)
    ref = LlavaForConditionalGeneration(config).eval()
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ref


def image_ids(image_token_id: int, n: int) -> torch.Tensor:
    return torch.tensor([[11, 12, 13] + [image_token_id] * n + [20, 21, 22, 23]])


@pytest.mark.parametrize("vision,llm,strategy,n", [("clip", "llama", "default", 16), ("clip", "qwen2", "full", 17),
                                                   ("siglip", "qwen2", "full", 16)])
def test_llava_hf_folder_loads_with_equal_logits(tmp_path, vision, llm, strategy, n):
    ref = save_llava_hf(tmp_path, vision, llm, strategy)
    tokenizer, model, processor, context_len = load_pretrained_model(tmp_path)
    assert model.vlm_config.num_image_tokens == n
    ids = image_ids(model.vlm_config.image_token_id, n)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
    assert max_diff(ours, theirs) <= PARITY_TOL


def test_llava_hf_default_strategy_on_siglip_is_refused(tmp_path):
    save_llava_hf(tmp_path, "siglip", "qwen2", "default")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default' on a siglip_vision_model tower"):
        load_pretrained_model(tmp_path)


# -- original LLaVA-1.5 in --------------------------------------------------------------------------


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-like tokenizer (<unk>, <s>, </s>) without <image>, as LLaVA-1.5 ships."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS + ["USER: ASSISTANT: A chat between a curious human"], trainer=trainer)
    # LLaMA's tokenizer adds <s> itself (add_bos_token), which LLaVA's prompts rely on
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny LLaVA-1.5 folder: LLaMA weights + model.mm_projector.* in pytorch_model.bin, the CLIP tower by path."""
    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    tower = CLIPVisionModel(tiny_vision_config("clip")).eval()
    tower.save_pretrained(root / "clip")
    tokenizer = llama_tokenizer()
    llm = LlamaForCausalLM(tiny_llm_config("llama", vocab_size=len(tokenizer), tie_word_embeddings=False)).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    folder = root / "llava-v1.5-tiny"
    folder.mkdir()
    state = dict(llm.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # what old checkpoints carry
    torch.save(state, folder / "pytorch_model.bin")
    config = {**llm.config.to_dict(), "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(root / "clip"), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
              "tune_mm_mlp_adapter": False}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder, tower, llm, projector, tokenizer


def llava_reference_logits(tower, llm, projector, before: list[int], after: list[int], pixels) -> torch.Tensor:
    """LLaVA-1.5's forward, written out: ids with IMAGE_TOKEN_INDEX (-200) replaced by the projected patches."""
    with torch.no_grad():
        features = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]  # (P, D)
        embed = llm.get_input_embeddings()
        inputs = torch.cat([embed(torch.tensor(before)), features, embed(torch.tensor(after))])[None]
        return llm(inputs_embeds=inputs).logits


def test_llava_original_folder_loads_with_equal_logits(llava_folder):
    folder, tower, llm, projector, tok = llava_folder
    tokenizer, model, processor, _ = load_pretrained_model(folder)
    image_token = model.vlm_config.image_token_id
    assert image_token == len(tok)  # <image> was added after LLaVA's vocabulary
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 1
    assert processor.config.aspect_ratio == "pad" and model.vlm_config.num_image_tokens == 16
    before, after = [1, 40, 41, 42], [50, 51, 52, 53, 54]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    theirs = llava_reference_logits(tower, llm, projector, before, after, pixels)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([before + [image_token] * 16 + after]), pixel_values=pixels).logits
    assert ours.shape[-1] == theirs.shape[-1] + 1
    assert max_diff(ours[..., : theirs.shape[-1]], theirs) <= PARITY_TOL
    assert torch.isfinite(ours).all()  # the appended <image> row is a real embedding, not garbage


def test_llava_original_answers_with_vicuna_template(llava_folder, tmp_path):
    folder = llava_folder[0]
    generator = load_generator(str(folder))
    assert generator.template == "vicuna_v1"
    image = write_image(tmp_path / "a.png")
    prompt = generator.prompt([{"role": "user", "content": "What color is the circle?"}], 1)
    assert generator.tokenizer.decode(prompt[:1]) == "<s>" and prompt.count(generator.model.vlm_config.image_token_id) == 16
    assert isinstance(generator.answer("What color is the circle?", str(image)), str)


@pytest.mark.parametrize("change,message", [
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end=true"),
    ({"image_aspect_ratio": "anyres"}, "LLaVA-NeXT options"),
])
def test_llava_original_unsupported_options_are_named(llava_folder, tmp_path, change, message):
    folder = llava_folder[0]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_pretrained_model(copy)


# -- llava-hf out -----------------------------------------------------------------------------------


def square_image(tmp_path: Path) -> Image.Image:
    return Image.open(write_image(tmp_path / "sq.png", size=(32, 32))).convert("RGB")


# siglip/layer 0 is the demo model's selection (its patch embeddings)
@pytest.mark.parametrize("vision,llm,select_feature,select_layer", [
    ("clip", "qwen2", "patch", -2), ("clip", "llama", "cls_patch", -2), ("siglip", "qwen2", "patch", 0)])
def test_export_loads_in_transformers_with_equal_logits_and_generations(tmp_path, vision, llm, select_feature,
                                                                        select_layer):
    source = save_tiny_folder(tmp_path / "ours", vision, llm, select_feature=select_feature, select_layer=select_layer,
                              template="chatml")
    out = tmp_path / "hf"
    assert export_main(["--format", "llava-hf", "--model", str(source), str(out)]) == 0
    ref = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    generator = load_generator(str(source))

    image = square_image(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ours_ids = generator.prompt([{"role": "user", "content": "What color is the circle?"}], 1)
    assert inputs["input_ids"][0].tolist() == ours_ids  # the processor expands <image> to num_image_tokens
    pixels = generator.image_processor([image], return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        ours = generator.model(input_ids=torch.tensor([ours_ids]), pixel_values=pixels).logits
        theirs = ref(**inputs).logits
    assert max_diff(ours, theirs) <= PARITY_TOL

    theirs_gen = ref.generate(**inputs, max_new_tokens=10, do_sample=False)[0, len(ours_ids):].tolist()
    stops = ref.generation_config.eos_token_id
    ours_gen = generate_ids(generator.model, [ours_ids], pixels, stop_ids=stops, pad_token_id=0,
                            settings=GenerationSettings(max_new_tokens=10))[0]
    assert len(ours_gen) >= 3
    assert theirs_gen[: len(ours_gen)] == ours_gen and (len(theirs_gen) == len(ours_gen) or theirs_gen[len(ours_gen)] in stops)

    # ... and the exported folder reads back into vlm with the same logits
    _, back, _, _ = load_pretrained_model(out)
    with torch.no_grad():
        assert max_diff(back(input_ids=torch.tensor([ours_ids]), pixel_values=pixels).logits, ours) <= PARITY_TOL


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_export_selects_the_same_vision_layer_for_every_select_layer(tmp_path, vision):
    """transformers reads vision_feature_layer=0 as 'no hidden states' (generate failed with a TypeError): every
    layer of a 2-layer tower, -3..2, gives transformers' LLaVA our logits, and its generate runs."""
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for select_layer in range(-3, 3):
        source = save_tiny_folder(tmp_path / f"ours{select_layer}", vision, "qwen2", select_layer=select_layer)
        export(source, tmp_path / f"hf{select_layer}")
        ref = LlavaForConditionalGeneration.from_pretrained(tmp_path / f"hf{select_layer}").eval()
        assert ref.config.vision_feature_layer < 0
        _, ours, _, _ = load_pretrained_model(source)
        ids = image_ids(ours.vlm_config.image_token_id, ours.vlm_config.num_image_tokens)
        with torch.no_grad():
            expected = ours(input_ids=ids, pixel_values=pixels).logits
            assert max_diff(ref(input_ids=ids, pixel_values=pixels).logits, expected) <= PARITY_TOL, select_layer
        out = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, do_sample=False)
        assert out.shape[0] == 1 and out.shape[1] > ids.shape[1]  # it ran and decoded at least one token


def test_export_chat_template_renders_vicuna_like_ours(tmp_path):
    source = save_tiny_folder(tmp_path / "ours", "clip", "llama", template="vicuna_v1")
    export(source, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Shape?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # the tiny byte-level tokenizer adds no BOS, so (as with LLaVA's tokenizer(prompt)) none is rendered
    assert text == "Be brief. USER: <image>\nColor? ASSISTANT: red</s>USER: Shape? ASSISTANT:"
    # a single <image> inside the text moves to the front, as LLaVA-1.5 and our vicuna_v1 place it
    moved = processor.apply_chat_template([{"role": "user", "content": "Color of this <image>?"}],
                                          add_generation_prompt=True)
    assert moved.endswith("USER: <image>\nColor of this ? ASSISTANT:")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    tokenizer = processor.tokenizer
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids("</s>"), tokenizer.eos_token_id]


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu"])
def test_export_refuses_what_llava_hf_cannot_express(tmp_path, capsys, projector):
    source = save_tiny_folder(tmp_path / "ours", "clip", "qwen2", projector=projector)
    with pytest.raises(ValueError, match=rf"cannot export to llava-hf: projector.type='{projector}'"):
        export(source, tmp_path / "hf")
    assert command("export")(["--model", str(source), str(tmp_path / "hf2")]) == 2
    assert "only has the mlp2x_gelu projector" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_exported_pad_processor_gives_our_pixels(tmp_path, vision):
    """LlavaImageProcessor fills the padding with int(mean*255), as LLaVA-1.5 and we do."""
    source = save_tiny_folder(tmp_path / "ours", vision, "qwen2")
    export(source, tmp_path / "hf")
    theirs = AutoProcessor.from_pretrained(tmp_path / "hf").image_processor
    generator = load_generator(str(source))
    image = Image.open(write_image(tmp_path / "wide.png", size=(50, 30))).convert("RGB")
    ours = generator.image_processor([image], return_tensors="pt")["pixel_values"]
    assert torch.equal(theirs(image, return_tensors="pt")["pixel_values"], ours)
