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
Only the order of the reduction differs, so values agree to float rounding (tests/test_supervised_loss.py).
An empty selection still runs the head on zero rows, so every parameter gets a (zero) gradient as with full
logits (DDP waits for each one).

`chunk_size` bounds memory further: the selected rows go through head + cross-entropy `chunk_size` at a time,
each chunk under activation checkpointing, so backward recomputes one chunk's logits at a time instead of
keeping all of them (costs one more head matmul per chunk).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


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
        chunk_size: rows of the head + cross-entropy at a time (None: all at once).
    Returns:
        the scalar loss, equal to transformers' `ForCausalLMLoss` on the full logits.
    """
    if shift_labels is None:
        shift_labels = shift_labels_left(labels, ignore_index)
    targets = shift_labels.reshape(-1).to(hidden_states.device)  # (B*T,)
    keep = targets != ignore_index
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])[keep]  # (N, D)
    targets = targets[keep]  # (N,)
    if chunk_size is None or hidden.shape[0] <= chunk_size:
        total = _summed_cross_entropy(hidden, targets, lm_head)
    else:
        total = sum(checkpoint(_summed_cross_entropy, hidden[i:i + chunk_size], targets[i:i + chunk_size], lm_head,
                               use_reentrant=False)
                    for i in range(0, hidden.shape[0], chunk_size))
    if num_items_in_batch is None:
        return total / targets.numel()  # 0/0 = NaN with no supervised token, as the reference's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


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


def _summed_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: Callable) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, V), upcast as transformers does
    return F.cross_entropy(logits, targets, reduction="sum")
