"""Batch tokenised samples: pad ids and labels, build the attention mask, concatenate the images.

Design choices:
- Images are concatenated in sample order into one `(N, 3, H, W)` tensor, N = all images of the batch,
  so the model fills the image-token runs of the batch in reading order with one masked scatter; a
  text-only sample contributes nothing and a batch without images gets `pixel_values=None`.
- Labels are padded with -100 (no loss on padding); the loss shifts, so padding needs no care here.
- Right padding for training, left padding for generation (new tokens append at the end of every row).
- Samples the dataset replaced (`SupervisedDataset(on_bad_image="replace")`) travel with the batch under
  `DATA_DROPS_KEY`, present only when there are some: a collator may run in a DataLoader worker, so the
  batch is how the count reaches the trainer, which removes the key before the forward.
"""

from __future__ import annotations

from typing import Any

import torch

from .conversation import IGNORE_INDEX
from .dataset import DATA_DROPS_KEY

PADDING_SIDES = ("right", "left")


class DataCollator:
    """Pads a list of `{"input_ids" (T,), "labels" (T,) optional, "pixel_values" (n, 3, H, W) or None}`.

    Returns `{"input_ids" (B, T), "attention_mask" (B, T), "labels" (B, T) if given, "pixel_values"
    (N, 3, H, W) or None}`, and `DATA_DROPS_KEY`: the samples' drop lists joined, when any sample has one.
    Other keys of the samples are ignored.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side={padding_side!r}; expected one of {PADDING_SIDES}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        has_labels = ["labels" in f and f["labels"] is not None for f in features]
        if any(has_labels) and not all(has_labels):
            raise ValueError("some samples have 'labels' and some do not; collate training and prompts separately")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        for i, row in enumerate(ids):
            if row.ndim != 1 or row.numel() == 0:
                raise ValueError(f"sample {i}: input_ids must be a non-empty 1-D sequence, got shape {tuple(row.shape)}")
        width = max(row.numel() for row in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor | None] = {
            "input_ids": self._pad(ids, width, self.pad_token_id),  # (B, T)
            "attention_mask": self._pad([torch.ones_like(row) for row in ids], width, 0),  # (B, T)
        }
        if all(has_labels):
            labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
            for i, (row, label) in enumerate(zip(ids, labels)):
                if label.shape != row.shape:
                    raise ValueError(f"sample {i}: labels shape {tuple(label.shape)} != input_ids shape {tuple(row.shape)}")
            batch["labels"] = self._pad(labels, width, IGNORE_INDEX)  # (B, T)
        batch["pixel_values"] = _concat_images(features)  # (N, 3, H, W) or None
        drops = [drop for f in features for drop in f.get(DATA_DROPS_KEY) or ()]
        if drops:
            batch[DATA_DROPS_KEY] = drops
        return batch

    def _pad(self, rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : row.numel()] = row
            else:
                out[i, width - row.numel():] = row
        return out


def _concat_images(features: list[dict[str, Any]]) -> torch.Tensor | None:
    """All images of the batch in sample order, (N, 3, H, W); None when there are none."""
    images = []
    for i, feature in enumerate(features):
        pixels = feature.get("pixel_values")
        if pixels is None:
            continue
        if pixels.ndim != 4:
            raise ValueError(f"sample {i}: pixel_values must be (n, 3, H, W), got shape {tuple(pixels.shape)}")
        if images and pixels.shape[1:] != images[0].shape[1:]:
            raise ValueError(
                f"sample {i}: image shape {tuple(pixels.shape[1:])} differs from {tuple(images[0].shape[1:])} earlier in "
                "the batch; resize all images to the processor's size"
            )
        if pixels.shape[0]:
            images.append(pixels)
    return torch.cat(images) if images else None
