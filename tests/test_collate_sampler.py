"""DataCollator padding and image concatenation; modality/length-grouped samplers."""

from __future__ import annotations

import random

import pytest
import torch

from vlm.data.collate import DataCollator
from vlm.data.sampler import LengthGroupedSampler, ModalityLengthGroupedSampler

PAD = 0


def _feature(n_tokens: int, n_images: int, *, fill: int, size: int = 8) -> dict:
    ids = torch.arange(1, n_tokens + 1) + 100 * fill
    labels = ids.clone()
    labels[: n_tokens // 2] = -100
    pixels = torch.full((n_images, 3, size, size), float(fill)) if n_images else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def test_right_padding_mask_labels_and_mixed_images():
    features = [_feature(5, 1, fill=1), _feature(3, 0, fill=2), _feature(4, 2, fill=3)]
    batch = DataCollator(pad_token_id=PAD)(features)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, 5)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == [201, 202, 203, PAD, PAD]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 202, 203, -100, -100]
    assert batch["labels"][0].tolist() == features[0]["labels"].tolist()
    # images of samples 0 and 2 in sample order; the text-only sample adds none
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 3.0]


def test_left_padding_for_generation_without_labels():
    features = [{"input_ids": [7, 8, 9]}, {"input_ids": [5]}]
    batch = DataCollator(pad_token_id=PAD, padding_side="left")(features)
    assert batch["input_ids"].tolist() == [[7, 8, 9], [PAD, PAD, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch and batch["pixel_values"] is None


def test_no_image_batch_and_pad_to_multiple():
    batch = DataCollator(pad_token_id=PAD, pad_to_multiple_of=8)([_feature(5, 0, fill=1), _feature(9, 0, fill=2)])
    assert batch["input_ids"].shape == (2, 16) and batch["pixel_values"] is None
    assert batch["attention_mask"].sum().item() == 14


def test_collator_rejects_inconsistent_input():
    collate = DataCollator(pad_token_id=PAD)
    with pytest.raises(ValueError, match="image shape"):
        collate([_feature(3, 1, fill=1, size=8), _feature(3, 1, fill=2, size=16)])
    with pytest.raises(ValueError, match="labels"):
        collate([_feature(3, 0, fill=1), {"input_ids": [1, 2]}])
    bad = _feature(3, 0, fill=1)
    bad["labels"] = bad["labels"][:2]
    with pytest.raises(ValueError, match="sample 0"):
        collate([bad])
    with pytest.raises(ValueError, match="padding_side"):
        DataCollator(pad_token_id=PAD, padding_side="middle")


def _dataset(n: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    return [rng.randint(10, 500) for _ in range(n)], [rng.random() < 0.7 for _ in range(n)]


@pytest.mark.parametrize("n, batch_size, world_size", [(103, 4, 1), (250, 3, 2), (64, 8, 4), (5, 4, 2)])
def test_modality_sampler_invariants(n, batch_size, world_size):
    lengths, has_image = _dataset(n)
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size, world_size=world_size, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(n)) and len(sampler) == n
    global_batches = sampler.global_batches()
    assert [i for g in global_batches for device in g for i in device] == order
    step = batch_size * world_size
    for g in global_batches:
        members = [i for device in g for i in device]
        assert len({has_image[i] for i in members}) == 1, "a global batch mixes image and text-only samples"
        assert len(g) == world_size and len(members) <= step
    # only the leftovers (at most one per modality, at the end) are short
    sizes = [sum(map(len, g)) for g in global_batches]
    assert all(s == step for s in sizes[:-2])
    assert all(len(device) == batch_size for g in global_batches[:-2] for device in g)
    # each rank's view has one batch per global step
    for rank in range(world_size):
        assert sampler.batches(rank) == [g[rank] for g in global_batches]


def test_modality_sampler_is_deterministic_and_epoch_dependent():
    lengths, has_image = _dataset(200)
    a = ModalityLengthGroupedSampler(lengths, has_image, 4, seed=1)
    b = ModalityLengthGroupedSampler(lengths, has_image, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ModalityLengthGroupedSampler(lengths, has_image, 4, seed=2)) != first


def test_length_grouping_reduces_padding():
    lengths, has_image = _dataset(800, seed=5)
    batch_size = 8

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)

    grouped = ModalityLengthGroupedSampler(lengths, has_image, batch_size).batches(0)
    ungrouped = ModalityLengthGroupedSampler(lengths, has_image, batch_size, megabatch_mult=1).batches(0)
    assert padded_tokens(grouped) < 0.75 * padded_tokens(ungrouped)
    for b in grouped[:-2]:  # sorted within its megabatch: longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_devices_get_balanced_lengths():
    lengths, has_image = _dataset(400, seed=7)
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, world_size=4, megabatch_mult=1)
    for g in sampler.global_batches()[:-2]:
        totals = [sum(lengths[i] for i in device) for device in g]
        assert max(totals) - min(totals) <= max(lengths[i] for device in g for i in device)


def test_length_grouped_sampler_covers_every_index():
    lengths, _ = _dataset(37)
    sampler = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=0)
    assert sorted(sampler) == list(range(37))
    with pytest.raises(ValueError, match="has_image"):
        ModalityLengthGroupedSampler([1, 2], [True], 2)
