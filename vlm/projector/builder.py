"""Projectors from vision-tower features to the LLM's embedding space.

The MLP follows LLaVA-1.5's `mlp2x_gelu` exactly (Linear, GELU, Linear as an `nn.Sequential`, so the
keys are `0.weight`, `2.weight`, ... as in original LLaVA checkpoints); `mlp{N}x_gelu` generalises it.
A `pixel_shuffle{k}_`/`avgpool{k}_` prefix puts a token-reducing k x k merge in front (`vlm.projector.merge`).
Reference: https://github.com/haotian-liu/LLaVA/blob/main/llava/model/multimodal_projector/builder.py
"""

from __future__ import annotations

import re

from torch import nn

from vlm.config import ProjectorConfig
from vlm.projector.merge import MergeProjector, merged_grid


def build_projector(config: ProjectorConfig) -> nn.Module:
    """Build the projector: (N, P, input_dim) -> (N, P / merge_factor**2, output_dim)."""
    config.validate()
    if config.input_dim is None or config.output_dim is None:
        raise ValueError("projector: input_dim and output_dim must be set before building (the model builder does this)")
    factor = config.merge_factor
    base = config.type.removeprefix(f"{config.merge}{factor}_") if config.merge else config.type  # -> "mlp2x_gelu"
    input_dim = config.input_dim * factor * factor if config.merge == "pixel_shuffle" else config.input_dim
    if base == "identity":
        return nn.Identity()
    if base == "linear":
        mlp: nn.Module = nn.Linear(input_dim, config.output_dim)
    else:
        depth = int(re.match(r"^mlp(\d+)x_gelu$", base).group(1))
        layers: list[nn.Module] = [nn.Linear(input_dim, config.output_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(config.output_dim, config.output_dim)]
        mlp = nn.Sequential(*layers)
    return MergeProjector(config.merge, factor, mlp) if config.merge else mlp


def projected_num_tokens(config: ProjectorConfig, num_features: int) -> int:
    """Image tokens the projector makes of `num_features` tower features per image (what each `<image>` expands
    to); ConfigError when a merging projector cannot tile them (not a square grid, side not divisible)."""
    if config.merge is None:
        return num_features
    return merged_grid(num_features, config.merge_factor, where=f"projector.type={config.type!r}") ** 2
