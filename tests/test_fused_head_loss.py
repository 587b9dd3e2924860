"""The supervised-only loss's fused head + cross-entropy (vlm.llm.loss._LinearCrossEntropy, issue 12 point 6:
training memory): with a plain `nn.Linear` head the logits are made, used and freed chunk by chunk inside one
autograd function. Loss and gradients (hidden states, weight, bias) equal transformers' `ForCausalLMLoss` on the
full logits, with any chunking, with the window count or the mean, under a scaled backward; other heads (LoRA,
quantized, sharded: anything but a plain Linear) still run their own forward.

Tolerance: float32, 1e-6 relative + 1e-7 absolute, as tests/test_supervised_loss.py."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from vlm.llm.loss import supervised_lm_loss

RTOL, ATOL = 1e-6, 1e-7
VOCAB, DIM = 50, 16


class _WrappedHead(torch.nn.Linear):
    """A head that is not a plain Linear (as a LoRA or 4-bit layer): it must be called, not read."""


def _case(seed: int = 0, head_type=torch.nn.Linear):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = head_type(DIM, VOCAB, bias=True)
    hidden = torch.randn(3, 13, DIM, generator=g)
    labels = torch.randint(0, VOCAB, (3, 13), generator=g)
    labels[:, :4] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    return head, hidden, labels


def _grads(loss_fn, head, hidden, scale: float):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = loss_fn(hidden)
    (loss * scale).backward()
    return loss.detach(), (hidden.grad, head.weight.grad, head.bias.grad)


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
@pytest.mark.parametrize("num_items", [None, 41])
def test_fused_loss_and_gradients_equal_transformers_full_logits_loss(chunk_size, num_items):
    head, hidden, labels = _case()
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    window = None if num_items is None else torch.tensor(num_items)
    for scale in (1.0, 0.5):  # 0.5: a backward that does not start at the loss (the stored gradients are scaled)
        expected, expected_grads = _grads(lambda h: ForCausalLMLoss(head(h), labels, VOCAB, num_items_in_batch=window),
                                          head, hidden, scale)
        calls.clear()
        loss, grads = _grads(lambda h: supervised_lm_loss(h, labels, head, num_items_in_batch=window,
                                                          chunk_size=chunk_size), head, hidden, scale)
        assert not calls  # fused: the head's weight is used directly, its forward never runs
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
        for got, want, name in zip(grads, expected_grads, ("hidden", "weight", "bias")):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_a_head_that_is_not_a_plain_linear_runs_its_forward_with_the_same_values(chunk_size):
    head, hidden, labels = _case(seed=1, head_type=_WrappedHead)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    expected, expected_grads = _grads(lambda h: ForCausalLMLoss(head(h), labels, VOCAB), head, hidden, 1.0)
    calls.clear()
    loss, grads = _grads(lambda h: supervised_lm_loss(h, labels, head, chunk_size=chunk_size), head, hidden, 1.0)
    assert calls  # the wrapper's forward ran (its hooks: LoRA, bitsandbytes, ZeRO-3 gathering)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_bfloat16_head_matches_the_unfused_bfloat16_computation():
    head, hidden, labels = _case(seed=2)
    head = head.to(torch.bfloat16)
    hidden = hidden.to(torch.bfloat16)
    expected, expected_grads = _grads(lambda h: ForCausalLMLoss(head(h), labels, VOCAB), head, hidden, 1.0)
    loss, grads = _grads(lambda h: supervised_lm_loss(h, labels, head, chunk_size=6), head, hidden, 1.0)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)  # the same bf16 logits, float32 softmax
    for got, want in zip(grads, expected_grads):  # bf16 matmuls, summed over chunks in float32 for the weight
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


def test_a_frozen_head_gets_no_gradient_and_a_second_backward_is_refused():
    head, hidden, labels = _case(seed=3)
    head.requires_grad_(False)  # stage 1 / LoRA: the LLM's head is frozen
    hidden = hidden.requires_grad_(True)
    loss = supervised_lm_loss(hidden, labels, head)
    loss.backward(retain_graph=True)
    assert head.weight.grad is None and hidden.grad is not None
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_an_evaluation_loss_computes_no_gradients(monkeypatch):
    """Under no_grad (the Trainer's loss-only evaluation) the function must not build the head's gradient: the
    weights still require grad there, so it is told by detaching them."""
    from vlm.llm import loss as loss_module

    wanted = []
    forward = loss_module._LinearCrossEntropy.forward

    def spy(ctx, *args):
        wanted.append(any(ctx.needs_input_grad[:3]))
        return forward(ctx, *args)

    monkeypatch.setattr(loss_module._LinearCrossEntropy, "forward", staticmethod(spy))
    head, hidden, labels = _case(seed=4)
    with torch.no_grad():
        evaluation = supervised_lm_loss(hidden, labels, head)
    training = supervised_lm_loss(hidden.requires_grad_(True), labels, head)
    assert wanted == [False, True]
    torch.testing.assert_close(evaluation, training.detach(), rtol=0, atol=0)
