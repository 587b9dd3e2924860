"""Loss only at supervised positions (vlm.llm.loss, issue 12 point 3): the training forward runs the LM head and
cross-entropy on the hidden states whose shifted label is supervised; its loss and every trainable parameter's
gradient equal the parent class's full-logits loss (transformers' ForCausalLMLoss), with and without
`num_items_in_batch`, chunked or not, with LoRA; evaluation and generation keep full logits.

Tolerance: float32, loss and gradients within 1e-6 relative + 1e-7 absolute (only the reduction order differs;
measured differences are ~1e-8)."""

from __future__ import annotations

import pytest
import torch

from tests.inference_helpers import tiny_model
from vlm.llm.loss import shift_labels_left, supervised_lm_loss

RTOL, ATOL = 1e-6, 1e-7


def _batch(model, seed: int = 0) -> dict:
    """Two right-padded samples, the first with an image; labels supervised on an answer span only."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.vlm_config
    n, vocab = cfg.num_image_tokens, model.config.vocab_size
    ids = torch.randint(10, vocab, (2, n + 14), generator=g)
    ids[ids == cfg.image_token_id] = 11
    ids[0, 2:2 + n] = cfg.image_token_id
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # padding
    labels = torch.full_like(ids, -100)
    labels[0, n + 6: n + 12] = ids[0, n + 6: n + 12]
    labels[1, 3:8] = ids[1, 3:8]
    size = cfg.vision.hf_config["image_size"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(1, 3, size, size, generator=g)}


def _loss_and_grads(model, batch: dict, *, supervised_only: bool, chunk_size=None, **kwargs):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.supervised_only_loss, inner.loss_chunk_size = supervised_only, chunk_size
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    # parameters the forward does not use (the tower's layers after the selected one) have no gradient either way
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(model, batch, **kwargs):
    full, full_grads = _loss_and_grads(model, batch, supervised_only=False, **kwargs)
    for chunk_size in (None, 3):
        fast, fast_grads = _loss_and_grads(model, batch, supervised_only=True, chunk_size=chunk_size, **kwargs)
        assert fast.logits is None and full.logits is not None
        torch.testing.assert_close(fast.loss, full.loss, rtol=RTOL, atol=ATOL)
        assert fast_grads.keys() == full_grads.keys() and len(full_grads) > 20
        for name in full_grads:
            torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=RTOL, atol=ATOL, msg=name)
    return full


@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_the_full_logits_loss(num_items):
    model, _, _ = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)  # tower, projector, LLM, lm_head (untied): every gradient compared
    batch = _batch(model)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    full = _assert_same(model, batch, **kwargs)
    supervised = int((shift_labels_left(batch["labels"]) != -100).sum())
    assert supervised == 11
    if num_items is not None:  # the window's count divides the sum: the same value as (mean x count / window)
        mean, _ = _loss_and_grads(model, batch, supervised_only=True)
        torch.testing.assert_close(full.loss, mean.loss * supervised / num_items, rtol=RTOL, atol=ATOL)


def test_with_lora_the_adapters_and_projector_get_the_same_gradients():
    from vlm.folders.lora import apply_lora

    model, _, _ = tiny_model()
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            torch.nn.init.normal_(p, std=0.02)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("mm_projector" in n for n in trainable)
    _assert_same(peft_model, _batch(model, seed=1), num_items_in_batch=torch.tensor(20))


def test_eval_and_generation_keep_full_logits():
    model, _, _ = tiny_model()
    batch = _batch(model)
    model.train()
    train_out = model(**batch)
    model.eval()
    with torch.no_grad():
        eval_out = model(**batch)
        no_labels = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1)
    assert train_out.logits is None
    assert eval_out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    torch.testing.assert_close(eval_out.loss, train_out.loss.detach(), rtol=RTOL, atol=ATOL)
    assert no_labels.loss is None and no_labels.logits.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(no_labels.logits[:, 0], eval_out.logits[:, -1])


def test_no_supervised_token_gives_the_references_value_and_zero_gradients():
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # position 0's label is never a target
    assert torch.isnan(supervised_lm_loss(hidden, labels, head))  # the reference's mean over nothing is NaN too
    loss = supervised_lm_loss(hidden, labels, head, num_items_in_batch=4)
    loss.backward()
    assert loss.item() == 0.0
    assert head.weight.grad is not None and not head.weight.grad.any()  # a zero gradient, not none (DDP)


def test_shift_labels_are_used_as_given():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 6, 8)
    shifted = torch.randint(0, 11, (2, 6))
    shifted[0, :2] = -100
    expected = ForCausalLMLoss(head(hidden), None, 11, shift_labels=shifted)
    torch.testing.assert_close(supervised_lm_loss(hidden, None, head, shift_labels=shifted), expected,
                               rtol=RTOL, atol=ATOL)
