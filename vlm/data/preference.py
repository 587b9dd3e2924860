"""Preference pairs for DPO: each pair tokenised as two sequences, the training dataset, and the pair collator.

    dataset = PreferenceDataset(records, tokenizer, "chatml", processor, num_image_tokens=64, max_length=2048)
    dataset[0]  # {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "pixel_values",
                #  "pair_index"}
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    # input_ids (2B, T): the B chosen rows, then the B rejected rows; pixel_values (N, 3, H, W): the B samples'
    # images once; pair_index (B,)

Design choices:
- A preference sample (DESIGN.md: a canonical sample whose messages end with a user turn, plus "chosen" and
  "rejected") is validated and encoded by the data package's one path (`vlm.data.check.check_sample`, and
  `encode_preference_sides`: prompt + answer as the assistant's reply, with the template's end-of-turn), so a
  pair the check keeps is a pair the dataset can encode, with the same reasons for those it drops.
- Each side is tokenised as one whole conversation, the way the model sees it at inference, so the prompt's
  last tokens may differ between the sides where the answer's first characters merge with them; the two
  sequences are scored independently and need no shared prefix.
- Only the final reply is supervised (its tokens and the end-of-turn token closing it): earlier assistant turns
  of a multi-turn prompt are context. The template labels every reply; a reply is one contiguous labelled run
  and replies are separated by unlabelled user turns, so the last labelled run is the final reply
  (`final_reply_labels`). A template that writes replies back to back (`plain`, for captions) with a multi-turn
  prompt is refused for that pair (`template_mismatch`): the runs are counted, one per reply.
- The images are the pair's, decoded once; the collator puts them once in the batch and the model encodes
  them once for both halves (`forward(image_index=...)`, vlm.llm.mixin).
- Packing (`--packing`): the 2B sides are packed by the supervised `PackingCollator` (position ids restart per
  sequence, no attention mask: attention never crosses sequences), the images stay once, in pair order, with the
  image of each image run in the rows (`image_index`), and each position carries its sequence
  (`answer_sequence_index`), so each answer's log-probability is summed over its own segment: the padded batch's
  values (tests/test_dpo_packing.py).
- Training replaces a pair whose image became unusable after the check, as `SupervisedDataset` does (this
  class is one: the same indexing, lengths, modality flags and replacement).
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.data.check import check_sample, encode_preference_sides
from vlm.data.collate import DataCollator, PackingCollator, _concat_images
from vlm.data.conversation import IGNORE_INDEX
from vlm.data.dataset import DATA_DROPS_KEY, SupervisedDataset
from vlm.data.errors import SampleError
from vlm.data.paths import ImageFolder
from vlm.data.sample import is_preference, with_context
from vlm.visual.processor import PIL_DEFAULT_MAX_IMAGE_PIXELS

PAIR_INDEX_KEY = "pair_index"  # the pair's position in the dataset: where its precomputed reference log-probs are
ANSWER_SEQUENCE_KEY = "answer_sequence_index"  # packed rows: the sequence of each position (forward's keyword)
IMAGE_INDEX_KEY = "image_index"  # packed rows: the image of each image run (forward's keyword)


def final_reply_labels(labels: list[int]) -> list[int]:
    """`labels` with only the last run of supervised positions kept (the final reply and its end-of-turn)."""
    out = [IGNORE_INDEX] * len(labels)
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    out[start:end] = labels[start:end]
    return out


class PreferenceDataset(SupervisedDataset):
    """Lazily encoded preference pairs; the arguments are `SupervisedDataset`'s (`truncate` must be "none": a pair
    is never cut). An item is `{"chosen_input_ids" (Tc,), "chosen_labels" (Tc,), "rejected_input_ids" (Tr,),
    "rejected_labels" (Tr,), "pixel_values" (n, 3, H, W) | None, "pair_index": int}` (labels -100 except on the
    final reply), plus the replaced samples under `DATA_DROPS_KEY` as `SupervisedDataset` does."""

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("truncate", "none") != "none":
            raise ValueError("preference pairs are never truncated: truncate must be 'none'")
        super().__init__(*args, **kwargs)

    def _encode(self, index: int) -> dict[str, Any]:
        item, folder, where = self.record(index)
        sample_id = item.get("id") if isinstance(item, dict) else item.sample_id
        try:
            pair = encode_pair(item, folder, self.tokenizer, self.template, num_image_tokens=self.num_image_tokens,
                               max_length=self.max_length, escape_special_tokens=self.escape_special_tokens,
                               max_image_pixels=self.max_image_pixels)
            opened = pair.pop("images")
            pair["pixel_values"] = self._pixels(opened) if opened else None
        except SampleError as e:
            where = "" if e is item else where  # a reader's error already names its file and record
            raise with_context(e, index=index, sample_id=sample_id, where=where) from None
        pair[PAIR_INDEX_KEY] = index
        return pair


def encode_pair(item: Any, folder: ImageFolder, tokenizer: Any, template: Any, *, num_image_tokens: int,
                max_length: int | None = None, escape_special_tokens: bool = False,
                max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """One preference sample checked (`check_sample`, the checks of `vlm data check` in their order; its images
    decoded) and encoded: `{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}` as
    LongTensors (labels only on the final reply) and `"images"`, the decoded RGB images in order.

    Raises:
        SampleError: the check's reason; `bad_schema` for a plain conversation (no chosen/rejected).
    """
    if isinstance(item, dict) and not is_preference(item):
        raise SampleError("bad_schema", "not a preference sample (no 'chosen'/'rejected'): --method dpo trains on "
                          "preference pairs", sample_id=item.get("id"))
    options = dict(num_image_tokens=num_image_tokens, max_length=max_length,
                   escape_special_tokens=escape_special_tokens)
    _, opened = check_sample(item, folder, tokenizer, template, image_check="open", max_image_pixels=max_image_pixels,
                             **options)
    chosen, rejected = encode_preference_sides(item, tokenizer, template, **options)  # checks the final reply
    return {
        "chosen_input_ids": torch.tensor(chosen.input_ids, dtype=torch.long),
        "chosen_labels": torch.tensor(final_reply_labels(chosen.labels), dtype=torch.long),
        "rejected_input_ids": torch.tensor(rejected.input_ids, dtype=torch.long),
        "rejected_labels": torch.tensor(final_reply_labels(rejected.labels), dtype=torch.long),
        "images": opened,
    }


class PreferenceCollator:
    """Pads B pairs into one batch of 2B rows: `{"input_ids" (2B, T), "attention_mask" (2B, T), "labels" (2B, T),
    "pixel_values" (N, 3, H, W) | None (the B pairs' images, once), "pair_index" (B,)}`; rows 0..B-1 are the
    chosen sides, B..2B-1 the rejected ones in the same order (the model repeats the image features for them).
    The replaced samples travel under `DATA_DROPS_KEY` as with `DataCollator`.

    With `packing_max_length` (`--packing`) the 2B sequences (chosen ones, then rejected ones: sequence s is pair
    s mod B) are packed by `PackingCollator` into R rows of at most that many tokens, position ids restarting per
    sequence, no attention mask: `{"input_ids" (R, W), "position_ids" (R, W), "labels" (R, W),
    "answer_sequence_index" (R, W) (the sequence of each position, -1 on a row's padding tail), "pixel_values"
    (N, 3, H, W) | None (the pairs' images once, in pair order), "image_index" (M,) (the image of each image run in
    the rows' reading order: a pair's images serve both its sides), "pair_index" (B,)}`. The model then scores each
    sequence on its own segment: the same log-probabilities as padded rows (tests/test_dpo_packing.py)."""

    def __init__(self, pad_token_id: int, packing_max_length: int | None = None):
        self.padder = DataCollator(pad_token_id=pad_token_id)
        self.packer = None if packing_max_length is None else PackingCollator(pad_token_id, packing_max_length)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"], "pixel_values": p["pixel_values"],
                 **({DATA_DROPS_KEY: p[DATA_DROPS_KEY]} if DATA_DROPS_KEY in p else {})} for p in pairs]
        rows += [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs]
        batch = self.padder(rows) if self.packer is None else self._pack(pairs, rows)
        batch[PAIR_INDEX_KEY] = torch.tensor([p[PAIR_INDEX_KEY] for p in pairs], dtype=torch.long)  # (B,)
        return batch

    def _pack(self, pairs: list[dict[str, Any]], sequences: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(s["input_ids"]) for s in sequences]
        text_only = [{k: v for k, v in s.items() if k != "pixel_values"} for s in sequences]
        batch = self.packer(text_only)  # the images go in pair order below, not in the packed order
        rows = self.packer.rows(lengths)  # the packer's own placement (deterministic: the same rows)
        n_images = [0 if p["pixel_values"] is None else p["pixel_values"].shape[0] for p in pairs]
        first_image = [sum(n_images[:i]) for i in range(len(pairs))]
        sequence_index = torch.full_like(batch["input_ids"], -1)  # (R, W)
        image_index = []
        for r, row in enumerate(rows):
            start = 0
            for s in row:
                sequence_index[r, start:start + lengths[s]] = s
                start += lengths[s]
                pair = s % len(pairs)
                image_index += range(first_image[pair], first_image[pair] + n_images[pair])
        batch[ANSWER_SEQUENCE_KEY] = sequence_index
        batch["pixel_values"] = _concat_images(pairs)  # (N, 3, H, W) or None
        if batch["pixel_values"] is not None:
            batch[IMAGE_INDEX_KEY] = torch.tensor(image_index, dtype=torch.long)  # (M,)
        return batch
