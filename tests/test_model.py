"""Core model: parity with transformers' LLaVA, the splice, save/load, options."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

import vlm
from vlm.folders.weights import WEIGHTS_INDEX_NAME, load_state_dict_strict
from vlm.folders.keymap import VLM_TO_LLAVA_HF, rename_keys
from vlm.llm.splice import scatter_image_features
from vlm.model import text_config_from_dict
from vlm.tiny import tiny_vlm_config
from vlm.visual.tower import vision_config_from_dict

IMAGE_TOKEN_ID = 5
PARITY_TOL = 1e-5  # fp32; measured max abs diff is 0.0 (same kernels, same order of operations)


def make_model(vision: str = "siglip", llm: str = "qwen2", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = vlm.build_model(tiny_vlm_config(vision, llm, image_token_id=IMAGE_TOKEN_ID, **kwargs))
    return model.eval()


def make_batch(model, images_per_sample: list[int], length: int = 48, seed: int = 1):
    """Ids with image runs at varied offsets; pixel_values for all images in order."""
    g = torch.Generator().manual_seed(seed)
    n = model.vlm_config.num_image_tokens
    ids = torch.randint(10, 200, (len(images_per_sample), length), generator=g)
    for row, count in enumerate(images_per_sample):
        start = 1 + row
        for _ in range(count):
            ids[row, start:start + n] = IMAGE_TOKEN_ID
            start += n + 3
    size = model.vision_tower.image_size
    pixels = torch.randn(sum(images_per_sample), 3, size, size, generator=g) if sum(images_per_sample) else None
    return ids, pixels


def to_llava_hf(model) -> LlavaForConditionalGeneration:
    cfg = model.vlm_config
    tower = model.vision_tower
    llava_cfg = LlavaConfig(
        vision_config=vision_config_from_dict(cfg.vision.hf_config),
        text_config=text_config_from_dict(cfg.llm.hf_config),
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision.select_layer,
        vision_feature_select_strategy="default" if tower.has_cls_token else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    ref = LlavaForConditionalGeneration(llava_cfg)
    load_state_dict_strict(ref, rename_keys(model.state_dict(), VLM_TO_LLAVA_HF), source="converted weights")
    return ref.eval()


@pytest.mark.parametrize("vision,llm", [("clip", "llama"), ("siglip", "qwen2"), ("clip", "qwen3"), ("siglip", "mistral")])
def test_logits_equal_transformers_llava(vision, llm):
    model = make_model(vision, llm)
    ref = to_llava_hf(model)
    ids, pixels = make_batch(model, [1, 1])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        theirs = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= PARITY_TOL


@pytest.mark.parametrize("shift", [1, -1])
def test_parity_fails_when_splice_is_shifted(monkeypatch, shift):
    """The parity comparison catches a splice that writes the features one position off."""
    model = make_model("clip", "llama")
    ref = to_llava_hf(model)
    ids, pixels = make_batch(model, [1, 1])

    def shifted_scatter(embeds, mask, features):
        return scatter_image_features(embeds, torch.roll(mask, shift, dims=1), features)

    monkeypatch.setattr("vlm.llm.mixin.scatter_image_features", shifted_scatter)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() > 100 * PARITY_TOL


def test_text_only_equals_base_llm():
    model = make_model("siglip", "qwen2")
    base = AutoModelForCausalLM.from_config(text_config_from_dict(model.vlm_config.llm.hf_config)).eval()
    llm_state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    load_state_dict_strict(base, llm_state)
    ids, _ = make_batch(model, [0, 0])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_features_land_at_placeholders_in_order():
    """Several images per sample, a sample without images, in one batch: each run gets its own image."""
    model = make_model("clip", "qwen2")
    ids, pixels = make_batch(model, [2, 0, 1])
    n = model.vlm_config.num_image_tokens
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, pixels)
        features = model.encode_images(pixels)  # (3, n, D)
        token_embeds = model.get_input_embeddings()(ids)
    positions = (ids == IMAGE_TOKEN_ID).nonzero().tolist()
    assert len(positions) == 3 * n
    flat = features.reshape(-1, features.shape[-1])
    for k, (row, col) in enumerate(positions):
        assert torch.equal(embeds[row, col], flat[k]), f"position {(row, col)} should hold feature {k}"
    text = ids != IMAGE_TOKEN_ID
    assert torch.equal(embeds[text], token_embeds[text])
    # Image order matters: swapping the two images of sample 0 changes what lands there.
    with torch.no_grad():
        swapped = model.embed_multimodal(ids, pixels[[1, 0, 2]])
    assert not torch.equal(swapped[0], embeds[0]) and torch.equal(swapped[2], embeds[2])


def test_scatter_shifted_by_one_is_detected():
    embeds = torch.zeros(1, 6, 2)
    mask = torch.tensor([[False, True, True, False, False, False]])
    features = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    out = scatter_image_features(embeds, mask, features)
    assert out[0, 1].tolist() == [1.0, 1.0] and out[0, 2].tolist() == [2.0, 2.0]
    assert out[0, 0].tolist() == [0.0, 0.0] and out[0, 3].tolist() == [0.0, 0.0]


def test_batch_without_images():
    model = make_model()
    ids, pixels = make_batch(model, [0, 0])
    assert pixels is None
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_mismatch_raises_with_both_counts():
    model = make_model()
    n = model.vlm_config.num_image_tokens
    ids, pixels = make_batch(model, [1])
    cut = ids[:, : 1 + n - 3]  # truncated through the image
    with pytest.raises(ValueError, match=rf"{n - 3} image tokens but 1 image\(s\) x {n} features.*truncated"):
        model(input_ids=cut, pixel_values=pixels)
    with pytest.raises(ValueError, match=rf"{n} image tokens but 0 image"):
        model(input_ids=ids)  # placeholders but no pixels
    with pytest.raises(ValueError, match=rf"{n} image tokens but 2 image"):
        model(input_ids=ids, pixel_values=torch.cat([pixels, pixels]))


def test_gradient_checkpointing_and_projector_gradients():
    model = make_model("clip", "llama")
    ids, pixels = make_batch(model, [1, 0])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert model.model.gradient_checkpointing
    projector = [n for n in ckpt if n.startswith("mm_projector.")]
    assert len(projector) == 4 and all(ckpt[n].abs().sum() > 0 for n in projector)
    assert not any(n.startswith("vision_tower.") for n in ckpt), "a frozen tower gets no gradient"
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)


def test_frozen_tower_runs_without_autograd():
    model = make_model("clip", "llama")
    _, pixels = make_batch(model, [1])
    assert not model.vision_tower(pixels).requires_grad
    assert model.encode_images(pixels).requires_grad  # the projector trains


def test_unfrozen_tower_trains_only_layers_that_feed_the_selected_one():
    model = make_model("clip", "llama", select_layer=-2)
    model.vision_tower.set_trainable(True)
    ids, pixels = make_batch(model, [1])
    model.train()
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    trainable = {n for n, p in model.vision_tower.named_parameters() if p.requires_grad}
    assert any(".layers.0." in n for n in trainable)
    assert not any(".layers.1." in n or "post_layernorm" in n for n in trainable)  # 2 layers, select -2
    for name, p in model.vision_tower.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_generation_encodes_images_once():
    model = make_model()
    ids, pixels = make_batch(model, [1], length=24)
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=5, do_sample=False, pad_token_id=0)
    handle.remove()
    assert out.shape[1] == ids.shape[1] + 5
    assert len(calls) == 1


@pytest.mark.parametrize("vision,select_feature,expected", [
    ("clip", "patch", 16), ("clip", "cls_patch", 17), ("siglip", "patch", 16), ("siglip", "cls_patch", 16)])
def test_num_image_tokens(vision, select_feature, expected):
    model = make_model(vision, select_feature=select_feature)
    _, pixels = make_batch(model, [1])
    assert model.vlm_config.num_image_tokens == expected
    assert model.encode_images(pixels).shape[1] == expected


def test_build_model_leaves_the_config_it_is_given_as_it_was():
    """The config is read-only: build_model's derived fields go to the copy the model carries."""
    config = tiny_vlm_config("clip", image_token_id=IMAGE_TOKEN_ID)
    before = config.to_dict()
    model = vlm.build_model(config, dtype="bfloat16", attn_implementation="eager")
    assert config.to_dict() == before and config.num_image_tokens is None and config.projector.input_dim is None
    assert (model.vlm_config.num_image_tokens, model.vlm_config.projector.input_dim) == (16, 32)
    assert (model.vlm_config.dtype, model.vlm_config.attn_implementation) == ("bfloat16", "eager")


@pytest.mark.parametrize("projector,depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_types(projector, depth):
    model = make_model(projector=projector)
    linears = [m for m in model.mm_projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth
    assert linears[-1].out_features == model.config.hidden_size


def test_identity_projector_needs_equal_dims():
    with pytest.raises(ValueError, match="identity.*equal dimensions"):
        make_model(projector="identity")


def test_identity_projector_passes_tower_features_to_the_llm_unchanged(tmp_path):
    """Vision hidden == LLM hidden (64): the decoder receives the tower's selected hidden states as they
    come out of transformers' CLIPVisionModel, exactly at the placeholders; the folder round-trips."""
    model = make_model("clip", "qwen2", projector="identity", hidden_size=64)
    assert isinstance(model.mm_projector, torch.nn.Identity) and not list(model.mm_projector.parameters())
    assert model.vision_tower.hidden_size == model.config.hidden_size == 64
    ids, pixels = make_batch(model, [1, 0, 2])
    seen = {}
    hook = model.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=ids)
        # the reference: CLIP's hidden_states[select_layer] without its CLS token, straight from transformers
        hidden = model.vision_tower.model(pixels, output_hidden_states=True).hidden_states
        expected = hidden[model.vlm_config.vision.select_layer][:, 1:]  # (3, P, 64)
        token_embeds = model.get_input_embeddings()(ids)
    hook.remove()
    assert torch.isfinite(out.loss) and out.logits.shape == (*ids.shape, model.config.vocab_size)
    embeds, image = seen["embeds"], ids == IMAGE_TOKEN_ID
    assert torch.equal(embeds[image], expected.reshape(-1, 64))  # row-major: images in order, patches in order
    assert torch.equal(embeds[~image], token_embeds[~image])

    model.save_pretrained(tmp_path)
    loaded = vlm.from_pretrained(tmp_path).eval()
    assert loaded.vlm_config.projector.type == "identity" and isinstance(loaded.mm_projector, torch.nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, out.logits)


def test_save_load_roundtrip_identical_logits(tmp_path):
    model = make_model("clip", "llama")
    ids, pixels = make_batch(model, [1, 0])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = vlm.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           loaded(input_ids=ids, pixel_values=pixels).logits)


def test_sharded_save_roundtrip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(tmp_path / WEIGHTS_INDEX_NAME)
    loaded = vlm.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_strict_loading_lists_bad_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["mm_projector.0.bias"]
    state["mm_projector.9.weight"] = torch.zeros(1)
    state["model.norm.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        vlm.from_pretrained(tmp_path)
    message = str(err.value)
    assert "1 missing key(s) [mm_projector.0.bias]" in message
    assert "1 unexpected key(s) [mm_projector.9.weight]" in message
    assert "model.norm.weight: checkpoint (3,) vs model (64,)" in message


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vlm.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vlm.from_pretrained(tmp_path)
    make_model().vlm_config.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        vlm.from_pretrained(tmp_path)


def test_dtype_follows_llm():
    torch.manual_seed(0)
    model = vlm.build_model(tiny_vlm_config(image_token_id=IMAGE_TOKEN_ID), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.vlm_config.dtype == "bfloat16"
    ids, pixels = make_batch(model, [1])
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=pixels.float()).logits.dtype == torch.bfloat16


def test_attention_implementations():
    sdpa = make_model("clip", "qwen2")
    eager = vlm.build_model(sdpa.vlm_config, attn_implementation="eager", load_weights=False)
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager"
    ids, pixels = make_batch(sdpa, [1])
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(input_ids=ids, pixel_values=pixels).logits,
                                   sdpa(input_ids=ids, pixel_values=pixels).logits, rtol=1e-4, atol=1e-5)


def test_flash_attention_needs_gpu_extra():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here; the error path is for machines without it")
    with pytest.raises(ImportError, match=r"vlm-kit\[gpu\]"):
        vlm.build_model(tiny_vlm_config(image_token_id=IMAGE_TOKEN_ID), attn_implementation="flash_attention_2")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="projector.type='mlp2x_relu'"):
        tiny_vlm_config(projector="mlp2x_relu")
    with pytest.raises(ValueError, match="select_feature"):
        tiny_vlm_config(select_feature="cls")
    with pytest.raises(ValueError, match="mm_vision_select_layer=-9 is out of range"):
        make_model(select_layer=-9)
    with pytest.raises(ValueError, match="unknown key"):
        vlm.VLMConfig.from_dict({**tiny_vlm_config().to_dict(), "vison": {}})
    with pytest.raises(ValueError, match="image_token_id=999 is outside"):
        vlm.build_model(tiny_vlm_config(image_token_id=999))
