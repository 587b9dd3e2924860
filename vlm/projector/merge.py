"""Token-reducing projectors: merge each k x k block of patch features, then the linear/MLP projector.

`pixel_shuffle{k}_<projector>` (e.g. `pixel_shuffle2_mlp2x_gelu`) concatenates the k*k features of each block
along channels, (N, G*G, D) -> (N, (G/k)^2, k*k*D), as Idefics3/SmolVLM's connector and nanoVLM's modality
projector do, then projects with `<projector>` (its first layer reads k*k*D). `avgpool{k}_<projector>` averages
each block instead, (N, G*G, D) -> (N, (G/k)^2, D). Either cuts the image tokens the LLM reads k*k-fold (4x for
k=2): `num_image_tokens` is (G/k)^2.

Order (checked against the references; ours is written from scratch): output token (i, j), row-major over the
(G/k, G/k) grid, holds the patches (k*i + a, k*j + b) for a, b in range(k) with `a` (the row in the block)
major, i.e. for k=2 top-left, top-right, bottom-left, bottom-right. nanoVLM reshapes to (N, G/k, k, G/k, k, D)
and permutes to (N, G/k, G/k, k, k, D) (https://github.com/huggingface/nanoVLM/blob/main/models/modality_projector.py);
Idefics3 (transformers' `Idefics3Connector.pixel_shuffle`) reaches the same order through two view/permute pairs.

Design choices:
- Works on the patch grid only: the features must be a square G x G grid with G divisible by k. A tower whose
  output carries a CLS token (`vision.select_feature="cls_patch"` on CLIP) is refused by the config rather
  than silently dropping the CLS token: use `select_feature="patch"`.
- Keys: the merge has no parameters; the projector after it is `mlp.*` (`mlp.0.weight`, `mlp.2.weight` for
  mlp2x_gelu). llava-hf has no such projector, so such a model is not exported there.

Measured on the demo (`vlm demo --patch_size 8 --max_steps 2500 --n_train 10000`, seed 0, 2 CPU cores): a 6x6 patch
grid, 36 image tokens with mlp2x_gelu: held-out accuracy 0.808 (blind 0.328); `--projector pixel_shuffle2_mlp2x_gelu`,
9 tokens: 0.672 (blind 0.347), 1.2-1.3x the steps/s (300-step runs, interleaved); the default demo (patch 16, 9
tokens, mlp2x_gelu): 0.682 (blind 0.330). It still learns; at this short schedule the 4x cut costs accuracy
against the same patches unmerged and matches the 9-token default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.errors import ConfigError


def merged_grid(num_tokens: int, factor: int, where: str = "projector") -> int:
    """The side G/k of the merged grid of `num_tokens` = G*G patch features; ConfigError when G*G is not a square
    or G is not divisible by `factor`."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or side % factor:
        raise ConfigError(
            f"{where}: merging {factor}x{factor} blocks needs a square grid of patches with a side divisible by "
            f"{factor}; the vision tower gives {num_tokens} features per image"
            f"{f' ({side}x{side})' if side * side == num_tokens else ''}; choose image_size/patch_size so that "
            f"image_size // patch_size is a multiple of {factor}, or a projector without merging"
        )
    return side // factor


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, G*G, D) -> (N, (G/k)^2, k*k*D): each k x k block's features side by side, row-major in the block."""
    n, p, d = features.shape
    out = merged_grid(p, factor)
    x = features.reshape(n, out, factor, out, factor, d)  # (N, block row, row in block, block col, col in block, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, block row, block col, row in block, col in block, D)
    return x.reshape(n, out * out, factor * factor * d)


def avg_pool(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, G*G, D) -> (N, (G/k)^2, D): the mean of each k x k block."""
    n, p, d = features.shape
    out = merged_grid(p, factor)
    return features.reshape(n, out, factor, out, factor, d).mean(dim=(2, 4)).reshape(n, out * out, d)


MERGES = {"pixel_shuffle": pixel_shuffle, "avgpool": avg_pool}


class MergeProjector(nn.Module):
    """A k x k spatial merge (`pixel_shuffle` or `avgpool`) followed by a projector `mlp`: (N, G*G, D_vision) ->
    (N, (G/k)^2, D_llm)."""

    def __init__(self, merge: str, factor: int, mlp: nn.Module):
        super().__init__()
        if merge not in MERGES:
            raise ConfigError(f"projector merge {merge!r}; expected one of {sorted(MERGES)}")
        self.merge, self.factor = merge, factor
        self.mlp = mlp

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(MERGES[self.merge](features, self.factor))

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}, factor={self.factor}"
