"""Checkpoint key maps between vlm and other layouts, as declarative tables (one place, tested both ways).

Each table is an ordered list of (pattern, replacement) regular expressions applied to the first rule
that matches a key; a key that matches no rule is an error, so nothing is dropped silently.

vlm layout: `vision_tower.model.*` (a transformers CLIP/SigLIP vision model), `mm_projector.{0,2,...}.*`
(nn.Sequential as original LLaVA), `model.*` and `lm_head.*` (the transformers causal LM).
"""

from __future__ import annotations

import re

import torch

from vlm.errors import FolderError

Rules = list[tuple[str, str]]

# transformers' LlavaForConditionalGeneration, in-memory layout (what `state_dict()` returns in 5.x).
# Only `mlp2x_gelu` (linear_1, GELU, linear_2) is expressible there.
VLM_TO_LLAVA_HF: Rules = [
    (r"^vision_tower\.model\.(.*)$", r"model.vision_tower.\1"),
    (r"^mm_projector\.0\.(.*)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^mm_projector\.2\.(.*)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^model\.(.*)$", r"model.language_model.\1"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
]

LLAVA_HF_TO_VLM: Rules = [
    # the on-disk layout written by save_pretrained (older names) and the in-memory one
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$", r"vision_tower.model.\1"),
    (r"^(?:model\.)?multi_modal_projector\.linear_1\.(.*)$", r"mm_projector.0.\1"),
    (r"^(?:model\.)?multi_modal_projector\.linear_2\.(.*)$", r"mm_projector.2.\1"),
    (r"^(?:model\.language_model\.|language_model\.model\.)(.*)$", r"model.\1"),
    (r"^(?:language_model\.)?lm_head\.(.*)$", r"lm_head.\1"),
]


# Original LLaVA-1.5 (`LlavaLlamaForCausalLM` and its Mistral/Qwen variants): the LLM's own keys, with the
# projector and (when saved) the CLIP/SigLIP tower inside `model.`.
LLAVA_ORIGINAL_TO_VLM: Rules = [
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.*)$", r"vision_tower.model.\1"),
    (r"^model\.mm_projector\.(.*)$", r"mm_projector.\1"),
    (r"^model\.(.*)$", r"model.\1"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
]

VLM_TO_LLAVA_ORIGINAL: Rules = [
    (r"^vision_tower\.model\.(.*)$", r"model.vision_tower.vision_tower.vision_model.\1"),
    (r"^mm_projector\.(.*)$", r"model.mm_projector.\1"),
    (r"^model\.(.*)$", r"model.\1"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
]

# Buffers older transformers versions saved in LLaVA-1.5 checkpoints; recomputed at load, never weights.
LLAVA_ORIGINAL_IGNORED: list[str] = [
    r"\.rotary_emb\.inv_freq$",
    r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?embeddings\.position_ids$",
]


def drop_keys(state_dict: dict[str, torch.Tensor], patterns: list[str]) -> dict[str, torch.Tensor]:
    """`state_dict` without the keys any of `patterns` finds (re.search)."""
    compiled = [re.compile(p) for p in patterns]
    return {k: v for k, v in state_dict.items() if not any(p.search(k) for p in compiled)}


def rename_keys(state_dict: dict[str, torch.Tensor], rules: Rules, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Apply the first matching rule to every key; raise FolderError listing keys no rule matches."""
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    compiled = [(re.compile(p), r) for p, r in rules]
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = tensor
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise FolderError(f"{len(unmatched)} key(s) of the {what} have no mapping: {unmatched[:20]}")
    return out
