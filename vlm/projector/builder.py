"""Projectors from vision-tower features to the LLM's embedding space.

The MLP follows LLaVA-1.5's `mlp2x_gelu` exactly (Linear, GELU, Linear as an `nn.Sequential`, so the
keys are `0.weight`, `2.weight`, ... as in original LLaVA checkpoints); `mlp{N}x_gelu` generalises it.
Reference: https://github.com/haotian-liu/LLaVA/blob/main/llava/model/multimodal_projector/builder.py
"""

from __future__ import annotations

import re

from torch import nn

from vlm.config import ProjectorConfig


def build_projector(config: ProjectorConfig) -> nn.Module:
    """Build the projector: (N, P, input_dim) -> (N, P, output_dim)."""
    config.validate()
    if config.input_dim is None or config.output_dim is None:
        raise ValueError("projector: input_dim and output_dim must be set before building (the model builder does this)")
    if config.type == "identity":
        return nn.Identity()
    if config.type == "linear":
        return nn.Linear(config.input_dim, config.output_dim)
    depth = int(re.match(r"^mlp(\d+)x_gelu$", config.type).group(1))
    layers: list[nn.Module] = [nn.Linear(config.input_dim, config.output_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(config.output_dim, config.output_dim)]
    return nn.Sequential(*layers)
