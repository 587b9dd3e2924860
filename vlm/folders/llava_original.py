"""Original LLaVA-1.5 folders (haotian-liu/LLaVA's `LlavaLlamaForCausalLM` and its variants) into vlm.

Such a folder is the LLM's `config.json` plus LLaVA's keys (`mm_vision_tower`, `mm_projector_type`,
`mm_vision_select_layer`, `mm_vision_select_feature`, `mm_hidden_size`, `image_aspect_ratio`, ...), the
LLM weights with the projector under `model.mm_projector.{0,2}.*` and sometimes the tower under
`model.vision_tower.vision_tower.*`, and the tokenizer.

Design choices:
- The vision tower is loaded from `mm_vision_tower` (a hub id or a folder) as LLaVA does; tower weights
  found in the checkpoint replace it (they are the trained ones when the tower was unfrozen). A
  checkpoint holding only part of a tower is an error.
- LLaVA marks images with the out-of-vocabulary id -200 (IMAGE_TOKEN_INDEX) and expands it inside the
  model. vlm uses an in-vocabulary `<image>` token repeated `num_image_tokens` times, so `<image>` is
  added to the tokenizer and one embedding row is appended (its value is never used: image features
  replace it). Logits at every text position equal LLaVA's.
- LLaVA options vlm does not implement (`mm_use_im_start_end`, `anyres` aspect ratio, `spatial_unpad`
  patch merging) are refused by name instead of being loaded into a model that would answer differently.
- Weights may be safetensors or LLaVA-1.5's `pytorch_model*.bin`, read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from vlm.errors import ConfigError, FolderError, MissingPathError
from vlm.folders.keymap import LLAVA_ORIGINAL_IGNORED, LLAVA_ORIGINAL_TO_VLM, drop_keys, rename_keys

# LLaVA's model_type -> the decoder's transformers model_type.
LLAVA_MODEL_TYPES: dict[str, str] = {
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
}
# Keys of LLaVA's config that are not the decoder's.
_LLAVA_KEYS = ("mm_", "image_aspect_ratio", "image_grid_pinpoints", "tune_mm", "freeze_mm", "unfreeze_mm",
               "use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length")
_TORCH_INDEX = "pytorch_model.bin.index.json"


def _refuse_unsupported(data: dict[str, Any], where: str) -> None:
    if data.get("mm_use_im_start_end"):
        raise ConfigError(f"{where}: mm_use_im_start_end=true (image start/end tokens) is not supported by vlm")
    if data.get("image_aspect_ratio") == "anyres" or str(data.get("mm_patch_merge_type", "flat")) != "flat":
        raise ConfigError(
            f"{where}: LLaVA-NeXT options (image_aspect_ratio={data.get('image_aspect_ratio')!r}, mm_patch_merge_type="
            f"{data.get('mm_patch_merge_type')!r}) are not supported; vlm loads LLaVA-1.5 models (flat, pad/square)"
        )


def vlm_config_from_llava_original(data: dict[str, Any], where: str = "config.json", *, vision_tower: str | None = None):
    """The VLMConfig of an original LLaVA config dict (the tower by name; `vision_tower` overrides it)."""
    from vlm.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig

    _refuse_unsupported(data, where)
    llm = {k: v for k, v in data.items() if not k.startswith(_LLAVA_KEYS)}
    model_type = LLAVA_MODEL_TYPES.get(llm.get("model_type"), llm.get("model_type"))
    llm["model_type"] = model_type
    for key in ("architectures", "_name_or_path", "transformers_version"):
        llm.pop(key, None)
    return VLMConfig(
        vision=VisionConfig(name_or_path=vision_tower or data["mm_vision_tower"],
                            select_layer=int(data.get("mm_vision_select_layer", -2)),
                            select_feature=data.get("mm_vision_select_feature", "patch")),
        projector=ProjectorConfig(type=data.get("mm_projector_type", "linear")),
        llm=LLMConfig(hf_config=llm),
        image_aspect_ratio=image_aspect_ratio(data),
    )


def read_checkpoint(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: safetensors (single or sharded) or `pytorch_model*.bin` (weights only)."""
    from vlm.folders.weights import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, load_state_dict, read_pickled_weights, shard_path

    folder = str(folder)
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) or os.path.isfile(os.path.join(folder, WEIGHTS_INDEX_NAME)):
        return load_state_dict(folder)
    files = ["pytorch_model.bin"]
    if os.path.isfile(os.path.join(folder, _TORCH_INDEX)):
        with open(os.path.join(folder, _TORCH_INDEX), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = shard_path(folder, name, os.path.join(folder, _TORCH_INDEX))
        if not os.path.isfile(path):
            raise MissingPathError(
                f"no weights in LLaVA folder {folder!r}: expected model.safetensors(.index.json) or "
                f"pytorch_model.bin(.index.json); {name} is missing"
            )
        state.update(read_pickled_weights(path))  # weights_only=True; refusals name the file
    return state


def load_llava_original(folder: str | os.PathLike, tokenizer, *, dtype=None, vision_tower: str | None = None,
                        cache_dir: str | None = None, attn_implementation: str | None = None):
    """An original LLaVA-1.5 folder as a vlm model; `<image>` is added to `tokenizer` (see module docstring).

    Args:
        folder: the LLaVA folder (config.json with mm_* keys, weights, tokenizer).
        tokenizer: its tokenizer; `<image>` is added to it when missing.
        vision_tower: load the tower from here instead of `mm_vision_tower` (e.g. a local copy).
        cache_dir: the Hugging Face hub cache a hub-id tower is read from (None: the default cache).
    """
    from vlm.config import read_json_object
    from vlm.data.tokenizer import ensure_image_token
    from vlm.folders.build import build_and_load
    from vlm.folders.weights import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    where = os.path.join(str(folder), "config.json")
    data = read_json_object(where)
    config = vlm_config_from_llava_original(data, where, vision_tower=vision_tower)
    image_token_id = ensure_image_token(tokenizer)
    llm = {**config.llm.hf_config, "vocab_size": max(config.llm.hf_config["vocab_size"], len(tokenizer))}
    config = config.replace(image_token_id=image_token_id, llm=dataclasses.replace(config.llm, hf_config=llm))
    state = drop_keys(read_checkpoint(folder), LLAVA_ORIGINAL_IGNORED)
    state = rename_keys(state, LLAVA_ORIGINAL_TO_VLM, what=f"LLaVA checkpoint {str(folder)!r}")

    def adapt(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        expected = model.state_dict()
        tower_keys = {k for k in expected if k.startswith("vision_tower.")}
        saved_tower = {k for k in state if k.startswith("vision_tower.")}
        if saved_tower and saved_tower != tower_keys:
            raise FolderError(
                f"LLaVA checkpoint {str(folder)!r} holds {len(saved_tower)} of the vision tower's {len(tower_keys)} "
                f"tensors; expected all or none (missing e.g. {sorted(tower_keys - saved_tower)[:3]})"
            )
        if not saved_tower:  # the pretrained tower of mm_vision_tower, as LLaVA loads it
            state.update({k: expected[k] for k in tower_keys})
        for key in ("model.embed_tokens.weight", "lm_head.weight"):  # rows appended for <image>: the mean row
            if key in state and key in expected and state[key].shape[0] < expected[key].shape[0]:
                old = state[key]
                state[key] = torch.cat([old, old.mean(0, keepdim=True).expand(expected[key].shape[0] - old.shape[0], -1)])
        return state

    names = [n for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, _TORCH_INDEX) if os.path.isfile(os.path.join(str(folder), n))]
    source = os.path.join(str(folder), names[0] if names else "pytorch_model.bin")
    # the tower loads its pretrained weights; the LLM and projector come from `state`
    return build_and_load(config, state, source=source, config_source=where, dtype=dtype or _dtype(data),
                          attn_implementation=attn_implementation, pretrained_tower=True, cache_dir=cache_dir,
                          adapt_state=adapt)


def _dtype(data: dict[str, Any]) -> str:
    name = str(data.get("torch_dtype") or data.get("dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def image_aspect_ratio(data: dict[str, Any]) -> str | None:
    """LLaVA's `image_aspect_ratio` as our processor's: 'pad' stays, anything else keeps the tower's default."""
    return "pad" if data.get("image_aspect_ratio") == "pad" else None
