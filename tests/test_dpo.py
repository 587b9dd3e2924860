"""DPO (issue 13 points 2 and 3): pair tokenisation, log-probabilities, the loss against TRL's own code, the reference
model, gradient accumulation, and a run through `vlm.train.run.run`.

Tolerances (float32 throughout):
- batched 2B-row answer log-probs vs each side run alone with full logits: 1e-5 relative + 1e-5 absolute (values
  are sums of ~10 log-probs of magnitude ~6; only the reduction order and the padded batch's matmul shapes
  differ; measured ~1e-6);
- loss and gradient vs TRL 1.16's `DPOTrainer._compute_loss` on the same per-token log-probs: 1e-6 relative +
  1e-7 absolute (the same float operations up to order);
- accumulation and DDP updates vs one large batch: 1e-5 relative + 1e-6 absolute on the final weights (the
  supervised tests' bound).
"""

from __future__ import annotations

import copy
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.inference_helpers import tiny_model, tiny_tokenizer
from vlm.data.paths import ImageFolder
from vlm.data.preference import PAIR_INDEX_KEY, PreferenceCollator, encode_pair, final_reply_labels
from vlm.train.dpo import DPOSettings, DPOTrainer, chosen_nll, dpo_loss, dpo_losses, pair_log_probs

TEMPLATE = "chatml"


def _image(path: Path, color) -> str:
    Image.new("RGB", (40, 32), color).save(path)
    return path.name


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[list[dict], str]:
    """Preference samples (two with an image, one text-only, one multi-turn) and their image folder."""
    folder = tmp_path_factory.mktemp("dpo_images")
    red, blue = _image(folder / "red.png", (220, 40, 40)), _image(folder / "blue.png", (40, 40, 220))
    samples = [
        {"id": "a", "images": [red], "messages": [{"role": "user", "content": "<image>\nWhat color is the circle?"}],
         "chosen": "red", "rejected": "blue blue"},
        {"id": "b", "images": [blue], "messages": [{"role": "user", "content": "<image>\nWhat shape is it?"}],
         "chosen": "circle", "rejected": "a square, not a circle"},
        {"id": "c", "images": [], "messages": [{"role": "user", "content": "How many shapes are there?"}],
         "chosen": "3", "rejected": "2 shapes"},
        {"id": "d", "images": [red], "messages": [
            {"role": "user", "content": "<image>\nIs there a blue square?"}, {"role": "assistant", "content": "no"},
            {"role": "user", "content": "What color is the circle?"}], "chosen": "red", "rejected": "yellow"},
    ]
    return samples, str(folder)


@pytest.fixture(scope="module")
def model_parts():
    tokenizer = tiny_tokenizer()
    model, tokenizer, processor = tiny_model(tokenizer=tokenizer, seed=0)
    return model, tokenizer, processor


class PairList(torch.utils.data.Dataset):
    """Encoded pairs as `PreferenceDataset` returns them, for trainers built directly in these tests."""

    def __init__(self, samples, folder, tokenizer, processor, num_image_tokens):
        from vlm.data.templates import get_template

        template = get_template(TEMPLATE, tokenizer)
        self.items = []
        for i, sample in enumerate(samples):
            pair = encode_pair(sample, ImageFolder(folder), tokenizer, template, num_image_tokens=num_image_tokens)
            images = pair.pop("images")
            pair["pixel_values"] = processor(images, return_tensors="pt")["pixel_values"] if images else None
            pair[PAIR_INDEX_KEY] = i
            self.items.append(pair)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _batch(samples, folder, model, tokenizer, processor) -> dict:
    data = PairList(samples, folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    return PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])


# -- pair tokenisation -----------------------------------------------------------------------------------------

def test_only_the_final_reply_is_supervised(pairs, model_parts):
    samples, folder = pairs
    model, tokenizer, processor = model_parts
    data = PairList(samples, folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    for sample, item in zip(samples, data.items):
        for side in ("chosen", "rejected"):
            labels = item[f"{side}_labels"]
            supervised = labels[labels != -100].tolist()
            # the answer and the end-of-turn token that closes it, nothing of the prompt (nor the earlier "no")
            assert tokenizer.decode(supervised) == sample[side] + "<|im_end|>", (sample["id"], side)
            assert item[f"{side}_input_ids"][labels != -100].tolist() == supervised
    assert final_reply_labels([-100, 5, 6, -100, -100, 7, 8, -100]) == [-100] * 5 + [7, 8, -100]


def test_collator_puts_chosen_rows_then_rejected_and_each_image_once(pairs, model_parts):
    samples, folder = pairs
    model, tokenizer, processor = model_parts
    batch = _batch(samples, folder, model, tokenizer, processor)
    b = len(samples)
    assert batch["input_ids"].shape[0] == 2 * b and batch[PAIR_INDEX_KEY].tolist() == list(range(b))
    assert batch["pixel_values"].shape[0] == 3  # a, b, d: once each, not once per side
    n_image = (batch["input_ids"] == model.vlm_config.image_token_id).sum(dim=1)
    assert torch.equal(n_image[:b], n_image[b:])


# -- log-probabilities ---------------------------------------------------------------------------------------

def _alone(model, ids: torch.Tensor, labels: torch.Tensor, pixels) -> torch.Tensor:
    """log p(answer) of one sequence run alone through the model's full-logits forward."""
    logits = model(input_ids=ids[None], pixel_values=pixels).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t+1
    target = labels[1:]
    keep = target != -100
    return logp[keep].gather(1, target[keep, None]).sum()


def test_batched_pair_log_probs_equal_each_sequence_alone(pairs, model_parts):
    samples, folder = pairs
    model, tokenizer, processor = model_parts
    data = PairList(samples, folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    batch = PreferenceCollator(tokenizer.pad_token_id)(data.items)
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            logps, counts = pair_log_probs(model, batch)
    finally:
        hook.remove()
    assert calls == [3]  # one vision forward for the 3 images of 8 rows
    expected, expected_counts = [], []
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            for item in data.items:
                ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
                expected.append(_alone(model, ids, labels, item["pixel_values"]))
                expected_counts.append(int((labels[1:] != -100).sum()))
    torch.testing.assert_close(logps, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts


# -- the loss against TRL --------------------------------------------------------------------------------------

def _trl_loss(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_chosen, ref_rejected, *, beta: float,
              loss_types: list[str], loss_weights: list[float] | None = None, label_smoothing: float = 0.0):
    """TRL 1.16's `DPOTrainer._compute_loss`, run on a stand-in model that returns `per_token` (2B, T-1) as the
    per-token log-probs (zero outside the completion, as TRL's fused head does for labels -100)."""
    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

    t = per_token.shape[1] + 1
    shift_mask = completion_mask[:, 1:]
    outputs = types.SimpleNamespace(log_probs=per_token * shift_mask, entropy=torch.zeros_like(per_token),
                                    mean_logits=torch.zeros_like(per_token),
                                    is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)
    fake_model = lambda **kwargs: outputs  # noqa: E731  (TRL calls model(**inputs, labels=..., fused_lm_head=True))
    trainer = TRLDPOTrainer.__new__(TRLDPOTrainer)
    identity = lambda x: x  # noqa: E731  (one process)
    trainer.__dict__.update(
        model=model, accelerator=types.SimpleNamespace(device=per_token.device, gather=identity,
                                                       gather_for_metrics=identity),
        beta=beta, precompute_ref_logps=True, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None, f_divergence_type="reverse_kl",
        label_smoothing=label_smoothing, use_weighting=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace())
    inputs = {"input_ids": torch.ones(per_token.shape[0], t, dtype=torch.long), "attention_mask": completion_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(fake_model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _fixed_logps(b: int = 4, t: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_token = (-torch.rand(2 * b, t - 1, generator=g) * 3).requires_grad_(True)  # (2B, T-1)
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for row in range(2 * b):  # answers of different lengths, after a prompt
        start = 2 + row % 3
        completion[row, start:start + 2 + (row * 5) % 6] = 1
    ref_chosen, ref_rejected = -torch.rand(b, generator=g) * 12, -torch.rand(b, generator=g) * 12
    return per_token, completion, ref_chosen, ref_rejected


def _ours(per_token, completion, ref_chosen, ref_rejected, settings: DPOSettings):
    b = ref_chosen.shape[0]
    shift = completion[:, 1:]
    logps, counts = (per_token * shift).sum(dim=1), shift.sum(dim=1)
    return dpo_loss(logps[:b], logps[b:], ref_chosen, ref_rejected, settings,
                    chosen_num_tokens=counts[:b], rejected_num_tokens=counts[b:])


@pytest.mark.parametrize("settings, trl", [
    (DPOSettings(beta=0.1), dict(loss_types=["sigmoid"])),
    (DPOSettings(beta=0.5, loss_type="ipo"), dict(loss_types=["ipo"])),
    (DPOSettings(beta=0.1, loss_type="robust", label_smoothing=0.2), dict(loss_types=["robust"], label_smoothing=0.2)),
    (DPOSettings(beta=0.1, rpo_alpha=0.7), dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.7])),
], ids=["sigmoid", "ipo", "robust_label_smoothing", "rpo_alpha"])
def test_loss_and_gradient_equal_trl(settings, trl):
    per_token, completion, ref_chosen, ref_rejected = _fixed_logps()
    loss, chosen_rewards, rejected_rewards = _ours(per_token, completion, ref_chosen, ref_rejected, settings)
    (ours_grad,) = torch.autograd.grad(loss, per_token)
    theirs, metrics = _trl_loss(per_token, completion, ref_chosen, ref_rejected, beta=settings.beta, **trl)
    (theirs_grad,) = torch.autograd.grad(theirs, per_token)
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-7)
    assert ours_grad.abs().sum() > 0
    # the rewards TRL logs, from the same numbers
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-6)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    assert accuracy == pytest.approx(metrics["rewards/accuracies"][0])


def test_cdpo_label_smoothing_equals_trl_and_the_published_formula():
    """cDPO (sigmoid with label smoothing ε): −(1−ε) log σ(βΔ) − ε log σ(−βΔ). TRL 1.16's `sigmoid` no longer takes ε;
    its `aot_unpaired` computes exactly this form on the chosen and rejected log-ratios after sorting each, so on
    pairs whose two log-ratio columns are already in the same ascending order (checked) it is the cDPO loss."""
    per_token, completion, ref_chosen, ref_rejected = _fixed_logps(seed=3)
    b, eps, beta = 4, 0.25, 0.3
    shift = completion[:, 1:]
    with torch.no_grad():  # make both log-ratio columns ascending in the same pair order
        logps = (per_token * shift).sum(dim=1)
        ref_chosen = logps[:b] - torch.tensor([-2.0, -0.5, 1.0, 2.5])
        ref_rejected = logps[b:] - torch.tensor([-1.0, 0.0, 0.5, 3.0])
    settings = DPOSettings(beta=beta, label_smoothing=eps)
    loss, _, _ = _ours(per_token, completion, ref_chosen, ref_rejected, settings)
    (ours_grad,) = torch.autograd.grad(loss, per_token)
    theirs, _ = _trl_loss(per_token, completion, ref_chosen, ref_rejected, beta=beta, loss_types=["aot_unpaired"],
                          label_smoothing=eps)
    (theirs_grad,) = torch.autograd.grad(theirs, per_token)
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-7)
    # the published formula, written out on the same numbers
    with torch.no_grad():
        logps = (per_token * shift).sum(dim=1)
        delta = (logps[:b] - ref_chosen) - (logps[b:] - ref_rejected)
        assert sorted((logps[:b] - ref_chosen).tolist()) == (logps[:b] - ref_chosen).tolist()
        expected = (-(1 - eps) * torch.log(torch.sigmoid(beta * delta))
                    - eps * torch.log(torch.sigmoid(-beta * delta))).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    # and ε = 0 is plain DPO, ε > 0 a different loss
    plain, _, _ = dpo_losses(logps[:b], logps[b:], ref_chosen, ref_rejected, beta=beta)
    assert not torch.allclose(plain.mean(), loss.detach())


def test_chosen_nll_is_the_mean_token_nll():
    logps, counts = torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])
    assert chosen_nll(logps, counts).item() == pytest.approx(2.0)
