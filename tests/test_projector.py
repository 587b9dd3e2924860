"""Token-reducing projectors (vlm.projector.merge): the exact 2x2 rearrangement, the reduced image-token count
through config, data and processor, the splice, save/load, the llava-hf refusal, and a short training run."""

from __future__ import annotations

import json

import pytest
import torch

import vlm
from inference_helpers import command, save_tiny_folder, tiny_model, write_image
from vlm.config import ProjectorConfig, VLMConfig
from vlm.errors import ConfigError
from vlm.folders.export import export
from vlm.folders.weights import save_model_folder
from vlm.processing import VLMProcessor
from vlm.projector import build_projector, projected_num_tokens
from vlm.projector.merge import MergeProjector, avg_pool, pixel_shuffle
from vlm.tiny import tiny_vlm_config

SHUFFLE = "pixel_shuffle2_mlp2x_gelu"


def grid_features(side: int, dim: int) -> torch.Tensor:
    """(1, side*side, dim): patch (r, c), channel d holds 100*r + 10*c + d, so every value names its origin."""
    r, c, d = torch.meshgrid(torch.arange(side), torch.arange(side), torch.arange(dim), indexing="ij")
    return (100 * r + 10 * c + d).float().reshape(1, side * side, dim)


def test_pixel_shuffle_puts_each_2x2_block_side_by_side_row_major():
    merged = pixel_shuffle(grid_features(4, 2), 2)
    assert merged.shape == (1, 4, 8)
    # token (i, j) of the 2x2 output grid: patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), each [d0, d1]
    expected = [
        [0, 1, 10, 11, 100, 101, 110, 111],
        [20, 21, 30, 31, 120, 121, 130, 131],
        [200, 201, 210, 211, 300, 301, 310, 311],
        [220, 221, 230, 231, 320, 321, 330, 331],
    ]
    assert merged[0].tolist() == expected


def test_pixel_shuffle_by_3_and_avgpool():
    merged = pixel_shuffle(grid_features(6, 1), 3)
    assert merged.shape == (1, 4, 9)
    assert merged[0, 1].tolist() == [30, 40, 50, 130, 140, 150, 230, 240, 250]
    pooled = avg_pool(grid_features(4, 2), 2)
    assert pooled.shape == (1, 4, 2)
    assert pooled[0].tolist() == [[55, 56], [75, 76], [255, 256], [275, 276]]  # means of the blocks above


@pytest.mark.parametrize("tokens,factor", [(15, 2), (36, 4), (17, 2)])
def test_merge_refuses_a_grid_it_cannot_tile(tokens, factor):
    with pytest.raises(ConfigError, match=rf"gives {tokens} features per image"):
        pixel_shuffle(torch.zeros(1, tokens, 2), factor)


@pytest.mark.parametrize("kind,in_features,tokens", [
    ("pixel_shuffle2_mlp2x_gelu", 32, 4), ("pixel_shuffle2_linear", 32, 4), ("avgpool2_mlp3x_gelu", 8, 4),
    ("mlp2x_gelu", 8, 16)])
def test_projector_shapes(kind, in_features, tokens):
    config = ProjectorConfig(type=kind, input_dim=8, output_dim=12)
    projector = build_projector(config)
    first = next(m for m in projector.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == in_features
    assert projector(torch.randn(3, 16, 8)).shape == (3, tokens, 12)
    assert projected_num_tokens(config, 16) == tokens
    if kind.startswith("pixel_shuffle"):  # the merge, then the same projector as without it
        assert isinstance(projector, MergeProjector)
        x = torch.randn(2, 16, 8)
        assert torch.equal(projector(x), projector.mlp(pixel_shuffle(x, 2)))


@pytest.mark.parametrize("kind,message", [
    ("pixel_shuffle2_identity", "a merge must be followed by 'linear' or 'mlp<N>x_gelu'"),
    ("pixel_shuffle1_mlp2x_gelu", "at least 2x2"),
    ("shuffle2_mlp2x_gelu", "optionally after a token-reducing 'pixel_shuffle<k>_'"),
])
def test_projector_type_validation(kind, message):
    with pytest.raises(ConfigError, match=message):
        ProjectorConfig(type=kind).validate()


def test_cls_patch_is_refused_with_a_merge():
    with pytest.raises(ConfigError, match="cannot take vision.select_feature='cls_patch'.*use 'patch'"):
        tiny_vlm_config("clip", projector=SHUFFLE, select_feature="cls_patch")


def test_build_refuses_an_odd_patch_grid():
    with pytest.raises(ConfigError, match=r"gives 9 features per image \(3x3\)"):
        vlm.build_model(tiny_vlm_config(projector=SHUFFLE, image_size=24))


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_splice_with_the_reduced_count(vision):
    """16 patches (32 px, patch 8) -> 4 image tokens per image; CLIP's CLS token is dropped by 'patch'."""
    model, tokenizer, image_processor = tiny_model(vision, projector=SHUFFLE)
    assert model.vlm_config.num_image_tokens == 4 == model.vision_tower.num_image_tokens // 4
    image_id = model.image_token_id
    ids = torch.randint(10, 100, (2, 20))
    ids[0, 3:7] = image_id
    ids[1, 1:5] = image_id
    ids[1, 9:13] = image_id
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        embeds = model.embed_multimodal(ids, pixels)
        features = model.mm_projector.mlp(pixel_shuffle(model.vision_tower(pixels), 2))  # (3, 4, D)
    assert logits.shape == (2, 20, model.config.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(embeds[0, 3:7], features[0])
    assert torch.equal(embeds[1, 1:5], features[1]) and torch.equal(embeds[1, 9:13], features[2])
    ids[1, 12] = 11  # one placeholder short: both counts in the error
    with pytest.raises(ValueError, match=r"has 11 image tokens but 3 image\(s\) x 4 features = 12 features"):
        model(input_ids=ids, pixel_values=pixels)


def test_processor_and_training_data_expand_to_the_reduced_count(tmp_path):
    model, tokenizer, image_processor = tiny_model(projector=SHUFFLE)
    processor = VLMProcessor.for_model(model, tokenizer, image_processor=image_processor, template="chatml")
    assert processor.num_image_tokens == 4
    inputs = processor("<image>\nWhat color is the circle?", images=write_image(tmp_path / "a.png"))
    assert (inputs["input_ids"] == model.image_token_id).sum().item() == 4
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_save_and_from_pretrained_give_equal_logits(tmp_path):
    model, tokenizer, image_processor = tiny_model(projector=SHUFFLE)
    save_model_folder(tmp_path / "m", model, tokenizer=tokenizer, image_processor=image_processor)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["projector"]["type"] == SHUFFLE and saved["num_image_tokens"] == 4
    assert VLMConfig.load(tmp_path / "m").projector.merge_factor == 2
    loaded = vlm.from_pretrained(tmp_path / "m")
    assert loaded.vlm_config == model.vlm_config
    ids = torch.randint(10, 100, (1, 12))
    ids[0, 2:6] = model.image_token_id
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           loaded(input_ids=ids, pixel_values=pixels).logits)


def test_llava_hf_export_is_refused_in_one_line(tmp_path, capsys):
    source = save_tiny_folder(tmp_path / "ours", "clip", "qwen2", projector=SHUFFLE)
    with pytest.raises(ConfigError, match=rf"cannot export to llava-hf: projector.type='{SHUFFLE}'"):
        export(source, tmp_path / "hf")
    assert command("export")(["--model", str(source), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm export: error: cannot export to llava-hf") and SHUFFLE in err[0]
    assert not (tmp_path / "hf2" / "model.safetensors").exists()


def test_text_only_training_step_reaches_the_merging_projector():
    """A batch without images still gives the projector a (zero) gradient (DDP needs one for every parameter)."""
    model, tokenizer, _ = tiny_model(projector=SHUFFLE)
    model.train()
    ids = torch.randint(10, 100, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.mm_projector.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_training_with_pixel_shuffle_lowers_the_loss(tmp_path):
    """train.py --mm_projector_type pixel_shuffle2_mlp2x_gelu on a tiny shapes set: the loss falls, and the
    model folder it writes has 4 image tokens per image."""
    from vlm.data.synth import generate_shapes_dataset
    from vlm.tiny import save_tiny_components
    from vlm.cli.train import main as train_main

    data = generate_shapes_dataset(tmp_path / "data", n_train=16, n_eval=2, image_size=32, seed=0)
    records = json.loads(open(data["train"], encoding="utf-8").read())
    llm, vision = save_tiny_components(tmp_path / "models", [t["value"] for r in records for t in r["conversations"]])
    out = tmp_path / "run"
    assert train_main([
        "--model_name_or_path", llm, "--vision_tower", vision, "--mm_projector_type", SHUFFLE,
        "--data_path", data["train"], "--image_folder", data["image_folder"], "--output_dir", str(out),
        "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", "0",
        "--logging_steps", "1", "--save_strategy", "no", "--max_steps", "30", "--per_device_train_batch_size", "8",
        "--learning_rate", "3e-3", "--mm_projector_lr", "3e-3"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses  # measured: 5.25 -> 2.69
    config = VLMConfig.load(out)
    assert config.projector.type == SHUFFLE and config.num_image_tokens == 4


@pytest.mark.parametrize("patches,factor", [(16, 2), (36, 2), (36, 3)])
def test_pixel_shuffle_equals_transformers_idefics3_connector(patches, factor):
    """The outside reference for the merge order: transformers' Idefics3Connector.pixel_shuffle, bit for bit."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = torch.randn(2, patches, 5, generator=torch.Generator().manual_seed(0))  # (B, P, D)
    assert torch.equal(pixel_shuffle(x, factor), Idefics3Connector.pixel_shuffle(None, x, factor))
