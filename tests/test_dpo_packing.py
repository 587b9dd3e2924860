"""DPO with `--packing` (issue 13 point 2: "Packing, if present, keeps each answer's log-probability exact"): the 2B
sides of a pair batch packed into rows (vlm.data.preference.PreferenceCollator(packing_max_length=...)), each image
encoded once for both sides, each answer scored on its own segment.

Tolerances (float32): packed vs padded (and vs each sequence alone through the full-logits forward) answer
log-probs 1e-5 relative + 1e-5 absolute (sums of ~10 log-probs of magnitude ~6; only matmul shapes and reduction
order differ); DPO loss 1e-6 + 1e-6 and gradients 1e-5 relative + 1e-6 absolute; the other pairs' log-probs after
one pair is perturbed: 1e-6 absolute (masked attention entries contribute exact zeros); a packed run's final
weights vs the padded run's: 1e-5 relative + 1e-6 absolute (the supervised accumulation tests' bound).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.inference_helpers import tiny_model, tiny_tokenizer
from tests.test_dpo import PairList, _alone, dpo_flags, dpo_workspace
from vlm.data.preference import ANSWER_SEQUENCE_KEY, IMAGE_INDEX_KEY, PreferenceCollator
from vlm.train.dpo import DPOSettings, dpo_loss, pair_log_probs

LOGP_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny model (seed 0) and five encoded pairs: images in four (one with two images), one text-only."""
    folder = tmp_path_factory.mktemp("dpo_packing_images")
    for name, color in {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40)}.items():
        Image.new("RGB", (40, 32), color).save(folder / f"{name}.png")
    ask = lambda text, *images: {"images": [f"{i}.png" for i in images], "messages": [  # noqa: E731
        {"role": "user", "content": "<image>\n" * len(images) + text}]}
    samples = [
        {"id": "a", **ask("What color is the circle?", "red"), "chosen": "red", "rejected": "blue blue"},
        {"id": "b", **ask("What shape is it?", "blue"), "chosen": "circle", "rejected": "a square, not a circle"},
        {"id": "c", **ask("How many shapes are there?"), "chosen": "3", "rejected": "2 shapes"},
        {"id": "d", **ask("Are the two the same color?", "green", "red"), "chosen": "no, green and red",
         "rejected": "yes"},
        {"id": "e", **ask("Which color?", "blue"), "chosen": "blue", "rejected": "green, I think"},
    ]
    tokenizer = tiny_tokenizer()
    model, tokenizer, processor = tiny_model(tokenizer=tokenizer, seed=0)
    data = PairList(samples, str(folder), tokenizer, processor, model.vlm_config.num_image_tokens)
    return model, tokenizer, data.items


def _collate(tokenizer, items, packed: bool) -> dict:
    lengths = [len(item[f"{side}_input_ids"]) for side in ("chosen", "rejected") for item in items]
    # rows of ~2.5 sequences: sequences share rows, and rows hold sides of different pairs out of their order
    width = int(2.5 * sorted(lengths)[len(lengths) // 2]) if packed else None
    return PreferenceCollator(tokenizer.pad_token_id, packing_max_length=width)(items)


@pytest.mark.parametrize("supervised_only", [True, False], ids=["answer_positions_only", "full_logits"])
def test_packed_log_probs_equal_padded_and_each_sequence_alone(parts, supervised_only):
    model, tokenizer, items = parts
    b = len(items)
    padded, packed = _collate(tokenizer, items, False), _collate(tokenizer, items, True)
    index = packed[ANSWER_SEQUENCE_KEY]
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < 2 * b  # really packed
    assert max(len(row.unique()) - (row == -1).any().item() for row in index) >= 2  # a row holds several sequences
    in_rows = [s for row in index.tolist() for s in dict.fromkeys(row) if s != -1]
    assert sorted(in_rows) == list(range(2 * b)) and in_rows != sorted(in_rows)  # every side, out of order
    assert packed[IMAGE_INDEX_KEY].tolist() != list(range(5)) * 2  # so the images are not in padded order either
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model.supervised_only_loss = supervised_only
    try:
        with torch.no_grad():
            expected, expected_counts = pair_log_probs(model, padded)
            logps, counts = pair_log_probs(model, packed)
    finally:
        hook.remove()
        model.supervised_only_loss = True
    assert calls == [5, 5]  # one vision forward per batch: the 5 images once, for 2 x 5 sides
    torch.testing.assert_close(logps, expected, **LOGP_TOL)
    assert torch.equal(counts, expected_counts)
    with torch.no_grad():  # and each side alone, through the full-logits forward
        alone = torch.stack([_alone(model, item[f"{side}_input_ids"], item[f"{side}_labels"], item["pixel_values"])
                             for side in ("chosen", "rejected") for item in items])
    torch.testing.assert_close(logps, alone, **LOGP_TOL)


def test_flash_attention_path_rows_joined_into_one_gives_the_same_log_probs(parts):
    """flash-attn reads packed position ids in one row only, so the model joins packed rows for it
    (`_answer_log_probs_as_one_row`); run here with SDPA, which reads the same packed position ids."""
    model, tokenizer, items = parts
    packed = _collate(tokenizer, items, True)
    with torch.no_grad():
        expected, counts = pair_log_probs(model, packed)
        embeds = model.embed_multimodal(packed["input_ids"], packed["pixel_values"], image_index=packed[IMAGE_INDEX_KEY])
        out = model._answer_log_probs_as_one_row(embeds, packed["position_ids"], packed["labels"],
                                                 packed[ANSWER_SEQUENCE_KEY], {})
    torch.testing.assert_close(out.logps, expected, **LOGP_TOL)
    assert torch.equal(out.num_tokens, counts)


def test_packed_dpo_loss_and_gradients_equal_padded(parts):
    model, tokenizer, items = parts
    b = len(items)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    ref = -torch.linspace(5, 20, 2 * b)  # fixed reference log-probs
    results = {}
    for packed in (False, True):
        logps, counts = pair_log_probs(model, _collate(tokenizer, items, packed))
        loss, _, _ = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], DPOSettings(beta=0.1, rpo_alpha=0.5),
                              chosen_num_tokens=counts[:b], rejected_num_tokens=counts[b:])
        results[packed] = (loss.detach(), torch.autograd.grad(loss, trainable))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for packed_grad, padded_grad in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in results[True][1])


def test_perturbing_one_pair_leaves_the_others_log_probs_unchanged(parts):
    model, tokenizer, items = parts
    b = len(items)
    changed = [dict(item) for item in items]
    first = changed[0]
    first["pixel_values"] = first["pixel_values"].flip(-1) + 0.5  # its image: both of its sides see it
    ids = first["chosen_input_ids"].clone()
    ids[1] = (ids[1] + 1) % len(tokenizer)  # a prompt token of its chosen side, same length: the same packing
    first["chosen_input_ids"] = ids
    before, after = _collate(tokenizer, items, True), _collate(tokenizer, changed, True)
    assert torch.equal(before[ANSWER_SEQUENCE_KEY], after[ANSWER_SEQUENCE_KEY])
    with torch.no_grad():
        old, _ = pair_log_probs(model, before)
        new, _ = pair_log_probs(model, after)
    others = [s for s in range(2 * b) if s % b != 0]
    torch.testing.assert_close(new[others], old[others], rtol=0, atol=1e-6)
    assert (new[[0, b]] - old[[0, b]]).abs().min() > 1e-3  # pair 0's two sides did change


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return dpo_workspace(tmp_path_factory.mktemp("dpo_packing_run"))


def test_packing_dpo_run_trains_as_the_padded_run(workspace, tmp_path):
    """`--packing True --method dpo` through run(): the same updates as the padded run (same pairs, same order); the
    packed run's reference log-probs are precomputed through the packed collator, the padded run's come from its
    frozen copy."""
    import json

    from safetensors.torch import load_file

    from vlm.train.config import RunConfig
    from vlm.train.run import run

    common = ("--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "5e-2", "--optim", "sgd",
              "--lr_scheduler_type", "constant", "--train_sampling_strategy", "sequential", "--save_strategy", "no",
              "--beta", "0.5", "--model_max_length", "256")
    packed = run(RunConfig.from_flags(dpo_flags(workspace, tmp_path / "packed", *common, "--packing", "True",
                                            "--precompute_ref_log_probs", "True")))
    run(RunConfig.from_flags(dpo_flags(workspace, tmp_path / "padded", *common)))
    collator, dataset = packed.trainer.data_collator, packed.trainer.train_dataset
    first = collator([dataset[i] for i in range(8)])
    assert ANSWER_SEQUENCE_KEY in first and first["input_ids"].shape[0] < 16  # the run's batches are packed
    rows = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    a, b = load_file(tmp_path / "packed" / "model.safetensors"), load_file(tmp_path / "padded" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    start = load_file(Path(workspace["llm"]) / "model.safetensors")
    moved = [k for k in a if k.startswith("model.") and k in start and not torch.equal(a[k], start[k])]
    assert moved  # the runs trained (the comparison is not of two untouched models)


def test_torch_varlen_packed_log_probs_equal_the_padded_sdpa_ones(parts):
    """`--attn_implementation torch_varlen` (vlm.llm.varlen) on packed pair rows: the per-sequence log-probabilities
    equal the padded batch's under SDPA."""
    from vlm.llm import varlen

    model, tokenizer, items = parts
    padded, packed = _collate(tokenizer, items, False), _collate(tokenizer, items, True)
    varlen.register()
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append((m.config._attn_implementation, "cu_seq_lens_q" in kw)), with_kwargs=True)
    with torch.no_grad():
        expected, expected_counts = pair_log_probs(model, padded)
        model.config._attn_implementation = varlen.NAME
        try:
            logps, counts = pair_log_probs(model, packed)
        finally:
            model.config._attn_implementation = "sdpa"
            hook.remove()
    assert seen == [("sdpa", False), (varlen.NAME, True)]  # the packed rows really went through the varlen path
    torch.testing.assert_close(logps, expected, **LOGP_TOL)
    assert torch.equal(counts, expected_counts)
