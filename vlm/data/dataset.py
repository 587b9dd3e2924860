"""`SupervisedDataset`: records indexed once at start, tokenised and images decoded on access.

    dataset = SupervisedDataset("llava_v1_5_mix665k.json", tokenizer, "vicuna_v1", processor,
                                image_folder="data", num_image_tokens=576, max_length=2048)
    dataset[0]  # {"input_ids": (T,), "labels": (T,), "pixel_values": (n, 3, H, W) or None}

Design choices:
- Indexing reads every source once (streamed) into `vlm.data.mix.MixedRecords`: one compact JSON
  bytes object per canonical sample, not nested dicts, so LLaVA's 665K records fit in well under
  2 GB (bench/bench_index.py measures it). Nothing is tokenised or decoded at start.
- `lengths` is a cheap estimate made at index time without a tokenizer: stored bytes / 4 (about
  one token per 4 bytes of English or per Chinese character, and per-message JSON overhead standing
  in for the template's) plus `num_image_tokens` per image. `has_image` marks samples with images.
  Both feed the modality-length sampler; neither is used for truncation.
- On access the sample goes through the same function as `vlm data check`
  (`vlm.data.check.check_sample`: one validator, one order, so the same reason; its images decoded as
  they are checked); a failure raises the `SampleError` with the dataset index, the sample id and the
  file. Training validates up front with
  `check.py` and passes the kept indices (`indices=`), so this is the last line of defence.
- An image that passed the up-front check but cannot be used when its batch is built (corrupt bytes
  under the default `--check_images exists`, a file deleted or swapped since) would crash a run hours
  in. With `on_bad_image="replace"` (training) such a sample is replaced by the next usable sample in
  dataset order, so the step still runs and the same bad file always gets the same stand-in, and the
  returned item carries `DATA_DROPS_KEY`: the dropped samples (position, id, reason, detail). Counting
  happens where the batch is consumed (`vlm.train.data_drops`), because this code may run in a
  DataLoader worker process whose memory the trainer never sees.
- No open file handles are held and everything pickles, so DataLoader workers (fork or spawn) work.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlm.data.check import check_sample
from vlm.data.errors import SampleError
from vlm.data.mix import MixedRecords, Source, parse_sources
from vlm.data.sample import with_context
from vlm.data.templates import Template, get_template
from vlm.visual.processor import PIL_DEFAULT_MAX_IMAGE_PIXELS

BYTES_PER_TOKEN = 4  # for the `lengths` estimate
DATA_DROPS_KEY = "data_drops"  # item/batch key listing samples replaced at run time
IMAGE_REASONS = ("unreadable_image", "missing_image", "unsafe_path")  # what a file can turn into after the check
ON_BAD_IMAGE = ("raise", "replace")
MAX_REPLACEMENT_TRIES = 64  # consecutive unusable samples before giving up (the drop ratio stops a run long before)


class SupervisedDataset(Dataset):
    """Lazily encoded training samples from one or more sources.

    Args:
        sources: a `MixedRecords`, `Source`(s), or `--data_path` values (comma-separated paths, a
            list of paths, or a YAML mix file) read with `image_folder` and `data_format`.
        tokenizer: Hugging Face tokenizer with `<image>`.
        template: chat template name (LLaVA `--version` aliases too) or `Template`.
        image_processor: an image processor called the transformers way,
            `image_processor(images, return_tensors="pt")["pixel_values"]` -> FloatTensor (n, 3, H, W)
            (`vlm.visual.ImageProcessor`, or transformers' own); may be None only when no sample has images.
        num_image_tokens: tokens each image expands to.
        max_length: longest sequence; None for no limit.
        truncate: "none" (too long -> SampleError) or "turns" (keep the first whole turns).
        image_folder, data_format, data_weights: used when `sources` are paths (see `mix.parse_sources`).
        seed: mixing seed (repeat fractions, `max_samples`).
        indices: positions of the mixed records to expose (e.g. the kept indices from `check_dataset`).
        max_image_pixels: decoding limit passed to `load_image`.
        on_bad_image: "raise" (a `SampleError`) or "replace" (the next usable sample, reported under
            `DATA_DROPS_KEY`; module docstring) for a sample whose image cannot be used.
        escape_special_tokens: tokenise special-token strings in message text as text (`encode_sample`).

    Attributes:
        records: the indexed `MixedRecords`.
        lengths: estimated tokens per exposed sample.
        has_image: whether each exposed sample has at least one image.
    """

    def __init__(
        self,
        sources: MixedRecords | Source | Sequence[Source] | str | Sequence[str],
        tokenizer: Any,
        template: str | Template,
        image_processor: Callable[..., Any] | None = None,
        *,
        num_image_tokens: int,
        max_length: int | None = None,
        truncate: str = "none",
        image_folder: str | Sequence[str] | None = None,
        data_format: str | Sequence[str] = "auto",
        data_weights: str | Sequence[float] | None = None,
        seed: int = 0,
        indices: Sequence[int] | None = None,
        max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS,
        on_bad_image: str = "raise",
        escape_special_tokens: bool = False,
    ):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image={on_bad_image!r}; expected one of {ON_BAD_IMAGE}")
        self.on_bad_image = on_bad_image
        self._unusable: set[int] = set()  # positions found bad in this process: not tried again as stand-ins
        if isinstance(sources, MixedRecords):
            self.records = sources
        else:
            if isinstance(sources, Source):
                sources = [sources]
            if not (isinstance(sources, (list, tuple)) and sources and all(isinstance(s, Source) for s in sources)):
                sources = parse_sources(sources, image_folder, data_format=data_format, weights=data_weights)
            self.records = MixedRecords(sources, seed=seed)
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template.bind(tokenizer)
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.truncate = truncate
        self.escape_special_tokens = escape_special_tokens
        self.max_image_pixels = max_image_pixels
        self._positions = list(range(len(self.records))) if indices is None else list(indices)
        bad = [p for p in self._positions if not 0 <= p < len(self.records)]
        if bad:
            raise ValueError(f"indices {bad[:5]} out of range for {len(self.records)} records")
        self.has_image = [self.records.num_images(p) > 0 for p in self._positions]
        self.lengths = [
            self.records.stored_size(p) // BYTES_PER_TOKEN + self.records.num_images(p) * num_image_tokens
            for p in self._positions
        ]

    def __len__(self) -> int:
        return len(self._positions)

    def record(self, index: int) -> tuple[Any, Any, str]:
        """Sample `index` as read, not encoded: (canonical sample or the reader's SampleError, its image folder,
        where it comes from)."""
        return self.records[self._positions[index]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """`{"input_ids": LongTensor (T,), "labels": LongTensor (T,), "pixel_values": FloatTensor (n, 3, H, W) | None}`,
        plus `DATA_DROPS_KEY: [{"index", "id", "reason", "detail"}, ...]` when samples were replaced."""
        if self.on_bad_image == "raise":
            return self._encode(index)
        drops: list[dict[str, Any]] = []
        for step in range(min(len(self), MAX_REPLACEMENT_TRIES)):
            position = (index + step) % len(self)
            if position in self._unusable:
                continue
            try:
                item = self._encode(position)
            except SampleError as e:
                if e.reason not in IMAGE_REASONS:
                    raise
                self._unusable.add(position)
                drops.append({"index": self._positions[position], "id": e.sample_id, "reason": e.reason,
                              "detail": e.detail})
                continue
            if drops:
                item[DATA_DROPS_KEY] = drops
            return item
        raise SampleError(drops[-1]["reason"] if drops else "unreadable_image",
                          f"{len(drops)} consecutive samples from index {index} have unusable images (first: "
                          f"{drops[0]['detail'] if drops else '?'}); check the image folder",
                          index=index)

    def _encode(self, index: int) -> dict[str, torch.Tensor | None]:
        item, folder, where = self.record(index)
        sample_id = item.get("id") if isinstance(item, dict) else item.sample_id
        try:
            # the checks of `vlm data check`, in its order; "open" decodes the images as it checks them
            encoded, opened = check_sample(item, folder, self.tokenizer, self.template, image_check="open",
                                           max_image_pixels=self.max_image_pixels,
                                           num_image_tokens=self.num_image_tokens, max_length=self.max_length,
                                           truncate=self.truncate, escape_special_tokens=self.escape_special_tokens)
            opened = opened[: encoded.num_images]  # truncate="turns" may keep only the first images
            pixel_values = self._pixels(opened) if opened else None
        except SampleError as e:
            where = "" if e is item else where  # a reader's error already names its file and record
            raise with_context(e, index=index, sample_id=sample_id, where=where) from None
        return {  # through numpy: torch.tensor reads a list of ints 4x slower (~50 us per 700 ids)
            "input_ids": torch.from_numpy(np.array(encoded.input_ids, dtype=np.int64)),
            "labels": torch.from_numpy(np.array(encoded.labels, dtype=np.int64)),
            "pixel_values": pixel_values,
        }

    def _pixels(self, opened: list) -> torch.Tensor:
        if self.image_processor is None:
            raise ValueError("a sample has images but the dataset was built without image_processor=")
        pixel_values = self.image_processor(opened, return_tensors="pt")["pixel_values"]
        if pixel_values.ndim != 4 or pixel_values.shape[0] != len(opened):
            raise ValueError(
                f"image_processor returned shape {tuple(pixel_values.shape)} for {len(opened)} image(s); "
                "expected (n, 3, H, W)"
            )
        return pixel_values
