"""Splicing projected image features into the LLM's input embeddings.

Placeholders are expanded in `vlm.data` (each `<image>` becomes `num_image_tokens` image-token ids),
so the model does one masked scatter: the k-th image-token position, in row-major order over the
batch, receives the k-th feature vector. Counts are checked first, because scattering anyway would
silently corrupt the embeddings (torchtitan and transformers' LLaVA do the same).
"""

from __future__ import annotations

import torch


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) bool mask of the image placeholder positions."""
    return input_ids == image_token_id


def scatter_image_features(inputs_embeds: torch.Tensor, mask: torch.Tensor,
                           image_features: torch.Tensor) -> torch.Tensor:
    """Place image features at the placeholder positions.

    Args:
        inputs_embeds: (B, T, D) token embeddings.
        mask: (B, T) bool, True at image placeholder positions.
        image_features: (N, P, D) projected features of the batch's N images, in sample order.
    Returns:
        (B, T, D) embeddings with the placeholder rows replaced, in order.
    Raises:
        ValueError: when the number of placeholders differs from N * P.
    """
    num_tokens = int(mask.sum())
    num_images, per_image = image_features.shape[0], image_features.shape[1]
    if num_tokens != num_images * per_image:
        raise ValueError(
            f"image features and image tokens do not match: the input has {num_tokens} image tokens but "
            f"{num_images} image(s) x {per_image} features = {num_images * per_image} features. Likely causes: "
            "the sequence was truncated through an image (raise model_max_length or drop long samples), the "
            "prompt was not built with vlm's chat template (each <image> must become num_image_tokens ids), "
            "or pixel_values do not match the images in the text."
        )
    if num_tokens == 0:
        return inputs_embeds
    features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)  # (N*P, D)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)
