"""Batch tokenised samples: pad them (`DataCollator`) or pack them (`PackingCollator`); concatenate the images.

Design choices:
- Images are concatenated in sample order into one `(N, 3, H, W)` tensor, N = all images of the batch,
  so the model fills the image-token runs of the batch in reading order with one masked scatter; a
  text-only sample contributes nothing and a batch without images gets `pixel_values=None`.
- Labels are padded with -100 (no loss on padding); the loss shifts, so padding needs no care here.
- Right padding for training, left padding for generation (new tokens append at the end of every row).
- Samples the dataset replaced (`SupervisedDataset(on_bad_image="replace")`) travel with the batch under
  `DATA_DROPS_KEY`, present only when there are some: a collator may run in a DataLoader worker, so the
  batch is how the count reaches the trainer, which removes the key before the forward.
- Packing (`--packing`, padding-free): samples are concatenated into rows of at most `max_length` tokens with
  position ids restarting at 0 for each sample and no `attention_mask`. transformers (5.x, SDPA and eager)
  then builds a block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`,
  used only when `attention_mask` and the cache are None: `vlm.llm.mixin` turns the cache off for such a
  batch), and flash-attn runs varlen from the same ids (in one row: the model joins the rows for it). Each
  sample's first label is -100, so no loss crosses a boundary; together with the shift inside the loss the
  packed batch gives each sample exactly the logits, loss terms and gradients it gets alone
  (tests/test_packing.py). Rows: as few as first fit (longest sample first) needs, filled evenly so that the
  batch's width (every row is computed to it) is small; the images follow the samples'
  order in the rows. A row's tail is padding whose position ids restart too (a block of its own, label -100).
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.errors import ConfigError

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
            raise ConfigError(f"padding_side={padding_side!r}; expected one of {PADDING_SIDES}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of}")
        self.pad_token_id = _pad_token_id(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels = _ids_and_labels(features)
        width = max(row.numel() for row in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor | None] = {
            "input_ids": self._pad(ids, width, self.pad_token_id),  # (B, T)
            "attention_mask": self._pad([torch.ones_like(row) for row in ids], width, 0),  # (B, T)
        }
        if labels is not None:
            batch["labels"] = self._pad(labels, width, IGNORE_INDEX)  # (B, T)
        batch["pixel_values"] = _concat_images(features)  # (N, 3, H, W) or None
        return _with_drops(batch, features)

    def _pad(self, rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : row.numel()] = row
            else:
                out[i, width - row.numel():] = row
        return out


class PackingCollator:
    """Packs a list of `{"input_ids" (T,), "labels" (T,) optional, "pixel_values" (n, 3, H, W) or None}` into rows.

    Returns `{"input_ids" (R, W), "position_ids" (R, W), "labels" (R, W) if given, "pixel_values" (N, 3, H, W) or
    None}` (no `attention_mask`: the position ids say where each sample starts), and `DATA_DROPS_KEY` as
    `DataCollator` does. R rows of at most `max_length` tokens (a longer sample gets a row of its own, never cut),
    W the longest row.
    """

    def __init__(self, pad_token_id: int, max_length: int):
        if max_length < 1:
            raise ConfigError(f"packing needs a positive row length (--model_max_length), got {max_length}")
        self.pad_token_id = _pad_token_id(pad_token_id)
        self.max_length = max_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels = _ids_and_labels(features)
        rows = self.rows([row.numel() for row in ids])
        order = [i for row in rows for i in row]
        width = max(sum(ids[i].numel() for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (R, W)
        position_ids = torch.zeros_like(input_ids)  # (R, W)
        packed_labels = torch.full_like(input_ids, IGNORE_INDEX)  # (R, W)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = ids[i].numel()
                input_ids[r, start:start + n] = ids[i]
                position_ids[r, start:start + n] = torch.arange(n)
                if labels is not None:
                    packed_labels[r, start + 1:start + n] = labels[i][1:]  # the first position: a boundary
                start += n
            position_ids[r, start:] = torch.arange(width - start)  # the tail: a block of its own
        batch: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids}
        if labels is not None:
            batch["labels"] = packed_labels
        batch["pixel_values"] = _concat_images([features[i] for i in order])  # (N, 3, H, W) in row order
        return _with_drops(batch, features)

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Sample indices per row, each row's samples in index order: as few rows as first fit (longest first) needs,
        filled evenly (each sample, longest first, to the emptiest row it fits in), so the batch's width, and with
        it the padding every row is computed on, is as small as those rows allow; first fit's rows where the even
        fill does not fit."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        first_fit = self._fill(order, lengths, rows=None)
        even = self._fill(order, lengths, rows=len(first_fit))
        return [sorted(row) for row in (even or first_fit)]

    def _fill(self, order: list[int], lengths: list[int], rows: int | None) -> list[list[int]] | None:
        """rows=None: first fit, a new row when none fits. rows=R: each sample to the emptiest of R rows it fits in
        (an empty row takes any sample: a longer one is never cut); None when one fits nowhere."""
        out: list[list[int]] = [[] for _ in range(rows or 0)]
        used = [0] * len(out)
        for i in order:
            fits = [r for r, n in enumerate(used) if n == 0 or n + lengths[i] <= self.max_length]
            if rows is None:
                r = fits[0] if fits else len(out)
                if not fits:
                    out.append([])
                    used.append(0)
            elif not fits:
                return None
            else:
                r = min(fits, key=lambda r: (used[r], r))
            out[r].append(i)
            used[r] += lengths[i]
        return out


def _pad_token_id(pad_token_id: int | None) -> int:
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
    return int(pad_token_id)


def _ids_and_labels(features: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The samples' input_ids (and labels, when every sample has them) as 1-D long tensors, checked."""
    if not features:
        raise ValueError("cannot collate an empty list of samples")
    has_labels = ["labels" in f and f["labels"] is not None for f in features]
    if any(has_labels) and not all(has_labels):
        raise ValueError("some samples have 'labels' and some do not; collate training and prompts separately")
    ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
    for i, row in enumerate(ids):
        if row.ndim != 1 or row.numel() == 0:
            raise ValueError(f"sample {i}: input_ids must be a non-empty 1-D sequence, got shape {tuple(row.shape)}")
    if not all(has_labels):
        return ids, None
    labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
    for i, (row, label) in enumerate(zip(ids, labels)):
        if label.shape != row.shape:
            raise ValueError(f"sample {i}: labels shape {tuple(label.shape)} != input_ids shape {tuple(row.shape)}")
    return ids, labels


def _with_drops(batch: dict[str, Any], features: list[dict[str, Any]]) -> dict[str, Any]:
    drops = [drop for f in features for drop in f.get(DATA_DROPS_KEY) or ()]
    if drops:
        batch[DATA_DROPS_KEY] = drops
    return batch


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
