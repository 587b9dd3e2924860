"""The causal-LM loss computed only where a label is supervised: no (B, T, V) logits in training.

transformers' `ForCausalLMLoss` runs the LM head on every position and then ignores the ones labelled -100.
In a VLM batch most positions carry no label (image tokens, prompts, padding: 59-71% on a LLaVA-665K-like
mix, issue 12), yet their logits, log-softmax and gradient are the largest tensors of a training step. Here
the shifted labels pick the positions first, and the head and cross-entropy run on those hidden states only.

The value is the one `ForCausalLMLoss` gives, by construction:
- labels are shifted inside (position t predicts label t+1; the last position predicts nothing), or the
  caller's `shift_labels` are used as they are;
- logits are upcast to float32 before the cross-entropy, as transformers does;
- without `num_items_in_batch`: the mean over supervised positions (NaN when there are none, like the
  reference); with it: the sum divided by `num_items_in_batch`, the supervised-token count of the whole
  gradient-accumulation window (DESIGN.md, Labels), which the Trainer passes to the forward.
Only the order of the reduction differs, so values agree to float rounding (tests/test_supervised_loss.py,
tests/test_fused_head_loss.py). An empty selection still gives the head a (zero) gradient, so every parameter
gets one as with full logits (DDP waits for each one).

No (N, V) logits are kept for backward either. With a plain `nn.Linear` head (the usual case: not LoRA-wrapped,
quantized or sharded by ZeRO-3) head and cross-entropy are one autograd function, `_LinearCrossEntropy`, run
`chunk_size` rows at a time (default: about 2**23 logits a chunk): each chunk's logits, loss and gradients
(softmax - one-hot, times the head's weight and the chunk's hidden states) are computed in forward and the
logits freed; backward only scales the stored gradients. The same matmuls as autograd's, none repeated; what
stays until backward is the (N, D) hidden-state gradient and the head's weight gradient (which backward
produces anyway). Without it the selected rows' logits, their log-softmax and, in backward, two (N, V)
gradients were the largest tensors of a packed step (42m model, 32K vocabulary: 3 x 122 MiB at 1001
supervised rows; bench/memory_profile.py). Any other head goes through its own forward (LoRA, bitsandbytes and
ZeRO-3 hooks run), all rows at once, or `chunk_size` at a time under activation checkpointing (backward then
recomputes one chunk's logits at a time: one more head matmul per chunk).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logits per chunk of the fused head + cross-entropy (32 MiB in float32): large enough for efficient matmuls.
FUSED_CHUNK_LOGITS = 2**23
# ... but in bf16/fp16 at least this many rows a chunk (see _fused_rows).
LOW_PRECISION_MIN_ROWS = 1024


def shift_labels_left(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: position t's target is label t+1, the last position's is `ignore_index`."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def supervised_lm_loss(hidden_states: torch.Tensor, labels: torch.Tensor | None, lm_head: Callable, *,
                       num_items_in_batch: torch.Tensor | int | None = None,
                       shift_labels: torch.Tensor | None = None, chunk_size: int | None = None,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of `lm_head(hidden_states)` at the supervised positions only.

    Args:
        hidden_states: (B, T, D) the decoder's final hidden states.
        labels: (B, T) unshifted labels, `ignore_index` where unsupervised (ignored when `shift_labels` is given).
        lm_head: maps (N, D) hidden states to (N, V) logits.
        num_items_in_batch: supervised tokens of the whole accumulation window: sum / this; None: the mean.
        shift_labels: (B, T) already-shifted targets (transformers' padding-free / context-parallel convention).
        chunk_size: rows of the head + cross-entropy at a time (None: about 2**23 logits a chunk with a plain
            `nn.Linear` head; all rows at once with any other head).
    Returns:
        the scalar loss, equal to transformers' `ForCausalLMLoss` on the full logits.
    """
    if shift_labels is None:
        shift_labels = shift_labels_left(labels, ignore_index)
    targets = shift_labels.reshape(-1).to(hidden_states.device)  # (B*T,)
    keep = targets != ignore_index
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])[keep]  # (N, D)
    targets = targets[keep]  # (N,)
    # 0/0 = NaN with no supervised token and no window count, as the reference's mean
    denominator = targets.numel() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(hidden.device)
    linear = _plain_linear(lm_head, hidden.shape[-1])
    if linear is not None:
        rows = chunk_size or _fused_rows(linear.weight, hidden.device.type)
        weight, bias = linear.weight, linear.bias
        if not torch.is_grad_enabled():  # an evaluation's loss: the function would still see weights wanting grads
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, denominator)
    if chunk_size is None or hidden.shape[0] <= chunk_size:
        total = _summed_cross_entropy(hidden, targets, lm_head)
    else:
        total = sum(checkpoint(_summed_cross_entropy, hidden[i:i + chunk_size], targets[i:i + chunk_size], lm_head,
                               use_reentrant=False)
                    for i in range(0, hidden.shape[0], chunk_size))
    return total / denominator


def answer_log_probs(hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: Callable, *,
                     sequence_index: torch.Tensor | None = None, all_positions: bool = False,
                     ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probability of the supervised tokens, from the hidden states at those positions only.

    Preference training (DPO) scores a whole answer: the sum over its tokens of log p(token | prefix). As for
    the loss above, the shifted labels pick the positions first and the head runs on those rows only.

    Args:
        hidden_states: (B, T, D) the decoder's final hidden states.
        labels: (B, T) unshifted labels, `ignore_index` where unsupervised.
        lm_head: maps (N, D) hidden states to (N, V) logits.
        sequence_index: (B, T) packed rows (vlm.data.preference, `--packing`): the sequence 0..S-1 each position
            belongs to (-1 on padding); each sequence's tokens are summed on their own. None: one sequence per row.
        all_positions: run the head on every position, (B, T, V) logits, and pick the supervised ones after
            (`--supervised_only_loss False`: the plain computation, same values).
    Returns:
        (logps, num_tokens): (S,) float32 sums of the supervised tokens' log-probabilities, and (S,) their counts;
        S = B without `sequence_index`.
    """
    targets = shift_labels_left(labels, ignore_index).to(hidden_states.device)  # (B, T)
    keep = targets != ignore_index  # (B, T)
    if sequence_index is None:
        owner = torch.arange(labels.shape[0], device=keep.device)[:, None].expand_as(keep)  # (B, T)
        count = labels.shape[0]
    else:
        # the token scored at t is the one at t+1: its sequence's (a sequence's first label is never supervised,
        # so t and t+1 belong to the same one wherever a target is kept)
        owner = shift_labels_left(sequence_index, -1).to(keep.device)  # (B, T)
        count = int(sequence_index.max()) + 1  # every sequence has positions in the rows
    if all_positions:
        logits = lm_head(hidden_states).float()  # (B, T, V)
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_logps = token_logps[keep]  # (N,)
    else:
        logits = lm_head(hidden_states[keep]).float()  # (N, V), upcast as the loss does
        token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
    owners = owner[keep]  # (N,) the sequence of each selected token
    logps = token_logps.new_zeros(count).index_add(0, owners, token_logps)  # (S,)
    num_tokens = torch.zeros(count, dtype=torch.long, device=keep.device).index_add(0, owners, torch.ones_like(owners))
    return logps, num_tokens


def _fused_rows(weight: torch.Tensor, device: str) -> int:
    """Rows per chunk of the fused head: about FUSED_CHUNK_LOGITS logits, and in a low-precision compute dtype at
    least LOW_PRECISION_MIN_ROWS, because there each chunk also casts and adds a (V, D) float32 weight gradient:
    with Qwen2.5's 151,936-token vocabulary 2**23 logits are 55 rows, and those per-chunk adds made a
    Qwen2.5-0.5B-shaped bf16 step on an H100 1.7-2.2x slower (6,382 tokens: 190-245 ms at 55 rows against 112 ms
    at 1024; 26,118 tokens: 549-606 ms against 314 ms; `python bench/step_profile.py --attn torch_varlen
    --min-rows 1 1024 1`, bench/RESULTS.md). In float32 the gradient is accumulated in place (addmm_) and small
    chunks cost nothing extra."""
    rows = max(1, FUSED_CHUNK_LOGITS // weight.shape[0])
    return rows if _compute_dtype(weight, device) == torch.float32 else max(rows, LOW_PRECISION_MIN_ROWS)


def _compute_dtype(weight: torch.Tensor, device: str) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the weight's."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _summed_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: Callable) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, V), upcast as transformers does
    return F.cross_entropy(logits, targets, reduction="sum")


def _plain_linear(lm_head: Callable, dim: int) -> nn.Linear | None:
    """The head as an `nn.Linear` whose weight can be used directly, or None: a subclass or wrapper (LoRA,
    bitsandbytes) must run its own forward, and so must a weight ZeRO-3 has partitioned (an empty tensor outside
    the module's forward) or a distributed tensor (FSDP2)."""
    if type(lm_head) is not nn.Linear:
        return None
    weight = lm_head.weight
    if type(weight.data) is not torch.Tensor or weight.dim() != 2 or weight.shape[1] != dim:
        return None
    return lm_head


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight.T + bias, target_i) / denominator, with the gradients computed chunk by
    chunk in forward (as Liger-Kernel's fused linear cross-entropy does) so that no (N, V) tensor outlives its chunk.

    Values as the unfused path's: logits in the compute dtype (autocast's when it is on, else the weight's), upcast
    to float32 for the log-softmax; d(loss)/d(logits) = (softmax - one-hot) / denominator, in the order autograd
    computes it (so a plain `loss.backward()` gives the same rounding); the hidden-state and bias gradients in
    the compute dtype, the weight gradient summed over chunks in float32. Backward multiplies the stored
    gradients by the incoming scalar in place when it is not 1, so it runs once (no retain_graph)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                rows: int, denominator: torch.Tensor | int) -> torch.Tensor:
        device = hidden.device.type
        dtype = _compute_dtype(weight, device)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)  # (V, D)
            b = None if bias is None else bias.to(dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            scale = torch.ones((), dtype=torch.float32, device=hidden.device) / denominator  # d(loss)/d(total)
            for i in range(0, hidden.shape[0], rows):
                h, t = hidden[i:i + rows].to(dtype), targets[i:i + rows]  # (n, D), (n,)
                log_probs = torch.log_softmax(F.linear(h, w, b).float(), dim=-1)  # (n, V)
                total -= log_probs.gather(1, t[:, None]).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                grad = log_probs.exp_().mul_(scale)  # (n, V) softmax x scale, in place
                grad[torch.arange(t.shape[0], device=t.device), t] -= scale
                grad = grad.to(dtype)
                if want_hidden:
                    torch.mm(grad, w, out=grad_hidden[i:i + rows])
                if want_weight:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad.T, h)
                    else:
                        grad_weight += (grad.T @ h).float()
                if want_bias:
                    grad_bias += grad.float().sum(0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused LM-head loss keeps its gradients for one backward: a second backward "
                               "through it (retain_graph) is not supported")
        grads, ctx.grads = ctx.grads, None
        out = []
        for grad, dtype in zip(grads, ctx.dtypes):
            if grad is not None:
                grad = grad.to(dtype)
                if not bool(grad_total == 1):
                    grad = grad.mul_(grad_total.to(grad.dtype))
            out.append(grad)
        return (*out, None, None, None)
