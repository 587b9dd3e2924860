"""Vision towers: CLIP and SigLIP vision models from `transformers`, with LLaVA's feature selection.

Design choices:
- The tower class is chosen from the config's `model_type` (a registry), never from a model name.
  A full CLIP/SigLIP checkpoint (text + vision) loads its vision half.
- Features come from `hidden_states[select_layer]` — the encoder output *before* the tower's
  `post_layernorm`, exactly as `transformers`' LLaVA and original LLaVA take them.
- A frozen tower runs under `torch.no_grad()`: no activations are kept for a backward pass that
  would never reach it. An unfrozen tower trains only the layers that feed the selected one; the
  layers after it and `post_layernorm` stay frozen, so DDP never sees parameters without gradients.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm.config import VisionConfig
from vlm.errors import ConfigError
from vlm.hub import pretrained_config


# model_type -> (vision model class, vision config class, has a CLS token)
VISION_TOWERS: dict[str, tuple[type[PreTrainedModel], type[PretrainedConfig], bool]] = {
    "clip_vision_model": (CLIPVisionModel, CLIPVisionConfig, True),
    "clip": (CLIPVisionModel, CLIPVisionConfig, True),
    "siglip_vision_model": (SiglipVisionModel, SiglipVisionConfig, False),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, False),
}


def _tower_entry(model_type: str) -> tuple[type[PreTrainedModel], type[PretrainedConfig], bool]:
    if model_type not in VISION_TOWERS:
        raise ConfigError(
            f"vision tower of type {model_type!r} is not supported; supported config types: {sorted(VISION_TOWERS)}"
        )
    return VISION_TOWERS[model_type]


def vision_config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    """Rebuild a `transformers` vision config from its `to_dict()` (a full CLIP/SigLIP config gives its vision half)."""
    data = dict(data)
    model_type = data.get("model_type")
    _, config_cls, _ = _tower_entry(model_type)
    if "vision_config" in data:  # a full CLIPConfig / SiglipConfig
        data = dict(data["vision_config"])
    data.pop("model_type", None)
    return config_cls(**data)


class VisionTower(nn.Module):
    """Wraps a `transformers` vision model and returns the selected features.

    forward: pixel_values (N, 3, H, W) -> features (N, P, D_vision)
    """

    def __init__(self, model: PreTrainedModel, *, select_layer: int = -2, select_feature: str = "patch",
                 frozen: bool = True):
        super().__init__()
        self.model = model
        self.has_cls_token = _tower_entry(model.config.model_type)[2]
        num_layers = model.config.num_hidden_layers
        # hidden_states has num_layers + 1 entries (the embeddings first).
        if not -(num_layers + 1) <= select_layer <= num_layers:
            raise ConfigError(
                f"mm_vision_select_layer={select_layer} is out of range for a tower with {num_layers} layers "
                f"(valid: {-(num_layers + 1)}..{num_layers})"
            )
        if select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"mm_vision_select_feature={select_feature!r}; expected 'patch' or 'cls_patch'")
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.set_trainable(not frozen)

    @classmethod
    def from_config(cls, config: VisionConfig, *, attn_implementation: str = "sdpa",
                    dtype: torch.dtype | None = None, load_weights: bool = True,
                    cache_dir: str | None = None) -> "VisionTower":
        """Build from `config.hf_config` (random weights) or load `config.name_or_path` (pretrained).

        `load_weights=False` builds the architecture of `name_or_path` without reading its weights
        (used when a saved VLM folder provides them). `cache_dir`: the Hugging Face hub cache a hub id is read
        from (None: the default cache).
        """
        if config.hf_config is not None and not (load_weights and config.name_or_path):
            hf_config = vision_config_from_dict(config.hf_config)
            model_cls = _tower_entry(hf_config.model_type)[0]
            hf_config._attn_implementation = attn_implementation
            model = model_cls(hf_config)
            if dtype is not None:
                model = model.to(dtype)
        else:
            model_type = pretrained_config(config.name_or_path, what="vision tower", cache_dir=cache_dir).model_type
            model_cls = _tower_entry(model_type)[0]
            model = model_cls.from_pretrained(config.name_or_path, attn_implementation=attn_implementation,
                                              dtype=dtype, cache_dir=cache_dir)
        return cls(model, select_layer=config.select_layer, select_feature=config.select_feature,
                   frozen=config.frozen)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def num_patches(self) -> int:
        return (self.model.config.image_size // self.model.config.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        keep_cls = self.has_cls_token and self.select_feature == "cls_patch"
        return self.num_patches + int(keep_cls)

    # -- training state -------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def set_trainable(self, trainable: bool) -> None:
        """Freeze the tower, or unfreeze the parameters that feed the selected layer (and only those)."""
        for p in self.parameters():
            p.requires_grad_(False)
        if not trainable:
            return
        num_layers = self.model.config.num_hidden_layers
        last_used = self.select_layer % (num_layers + 1)  # index into hidden_states; 0 = embeddings
        for name, p in self.model.named_parameters():
            match = re.search(r"\.layers\.(\d+)\.", name)
            if match is not None:
                p.requires_grad_(int(match.group(1)) < last_used)
            elif "post_layernorm" in name or name.startswith("head."):
                p.requires_grad_(False)
            else:  # embeddings and pre-norm feed every layer
                p.requires_grad_(True)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(  # otherwise a position-embedding size mismatch deep inside the tower
                f"pixel_values of shape {tuple(pixel_values.shape)}; the vision tower takes (N, 3, {self.image_size}, "
                f"{self.image_size}): use the model's own image processor (its preprocessor_config.json)"
            )
        pixel_values = pixel_values.to(dtype=self.model.dtype)  # (N, 3, H, W)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(pixel_values, output_hidden_states=True, return_dict=True)
            features = out.hidden_states[self.select_layer]  # (N, P(+1), D)
        if self.has_cls_token and self.select_feature == "patch":
            features = features[:, 1:]
        return features
