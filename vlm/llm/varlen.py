"""`attn_implementation="torch_varlen"`: padding-free packed rows attended sample by sample with PyTorch's own
variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`, CUDA), without the flash-attn package.

Why: on SDPA a packed row gets transformers' block-diagonal (T, T) mask, and the fused kernels compute every
masked block anyway; on an H100 with rows of 14.5K tokens that made attention 67% of a Qwen2.5-0.5B-shaped
step (`python bench/step_profile.py --batch 64 --pack-length 16384`, bench/RESULTS.md). Varlen attention
computes each sample's causal triangle only. flash-attn does the same (`flash_attention_2`) but has no wheel for
this project's torch, and building it takes hours; the kernel in PyTorch needs nothing more.

How it plugs in, through transformers' public registries (no patching): the name is registered in
`AttentionInterface` (the function below) and `AttentionMaskInterface` (`varlen_mask`: no mask where there is
no padding, as flash-attn's; SDPA's mask otherwise). For packed rows the mixin (vlm.llm.mixin) passes
`cu_seq_lens_q/k` and `max_length_q/k` (`packed_sequence_kwargs`, transformers' FlashAttentionKwargs names),
which the decoder layers hand to every attention call; without them, packed position ids are read here, as
transformers' flash-attn path reads them. Padded batches, decoding with a cache and the vision tower run
transformers' SDPA unchanged.

On a CPU (or a torch without the kernel) packed rows are attended sample by sample with SDPA: the same values,
and what the tests compare on this machine; the CUDA kernel is checked against SDPA by `bench/varlen_check.py`.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch.nn import functional as F

NAME = "torch_varlen"


def packed_sequence_kwargs(position_ids: torch.Tensor) -> dict:
    """(B, T) packed position ids (each sample restarts at 0; rows too) -> transformers' FlashAttentionKwargs for
    the flattened B*T tokens: cumulative sample boundaries and the longest sample."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()  # (S,) every row starts at position 0, so row ends are boundaries
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)  # (S + 1,)
    longest = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not one per layer
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                             max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, T, D), key/value (B, Hkv, S, D) -> (B, T, Hq, D).

    With `cu_seq_lens_q` (packed rows, no cache): causal attention within each sample of the flattened rows.
    Without: transformers' SDPA function, as `attn_implementation="sdpa"` would run.
    """
    position_ids = kwargs.get("position_ids")
    if (cu_seq_lens_q is None and attention_mask is None and position_ids is not None
            and query.shape[2] == key.shape[2] > 1):
        # packed rows that came without their boundaries (not through the mixin): read them from the positions
        cu_seq_lens_q, max_length_q = _boundaries_in(position_ids, query.shape[0])
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise ValueError("attn_implementation='torch_varlen' has no sliding-window attention; use 'sdpa'")
    if dropout:
        raise ValueError("attn_implementation='torch_varlen' has no attention dropout; use 'sdpa'")
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))  # (N, H, D)
    if q.is_cuda and _KERNEL is not None:
        out = _KERNEL(q, k, v, cu_seq_lens_q, max_length_q, scaling)
    else:
        out = _per_sample_sdpa(q, k, v, cu_seq_lens_q, scaling)
    return out.reshape(batch, length, heads, dim), None


# (weak reference to a position-id tensor, its version, its boundaries): every decoder layer of one forward gets
# the same tensor, so the scan (a host sync) runs once per forward instead of once per layer.
_last_scan: tuple = (None, -1, (None, None))


def _boundaries_in(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor | None, int | None]:
    """(cu_seq_lens, longest) of the samples packed in (B, T) `position_ids`, or (None, None) when every row is one
    sample."""
    global _last_scan
    ref, version, found = _last_scan
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return found
    found = (None, None)
    if _scan_for_restarts(position_ids):
        kw = packed_sequence_kwargs(position_ids.expand(rows, -1))
        found = (kw["cu_seq_lens_q"], kw["max_length_q"])
    _last_scan = (weakref.ref(position_ids), position_ids._version, found)
    return found


def _scan_for_restarts(position_ids: torch.Tensor) -> bool:
    """Whether a position restarts at 0 inside a row (packed samples)."""
    return bool((position_ids[:, 1:] == 0).any())


def _per_sample_sdpa(q, k, v, cu, scaling):
    """The reference computation: each sample's causal SDPA on its own ((N, H, D) in and out)."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(outs)


def _cuda_kernel():
    """PyTorch's varlen flash attention adapted to one call signature, or None where this torch has none. Its
    keywords changed between releases (2.10: `is_causal`; later: `window_size`, `enable_gqa`)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def run(q, k, v, cu, longest, scaling):
        extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        if "scale" in params:
            extra["scale"] = scaling
        elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
            raise ValueError("this torch's varlen_attn takes no scale; use attn_implementation='sdpa'")
        return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return run


_KERNEL = _cuda_kernel()


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, local_size: int | None = None, **kwargs):
    """transformers' mask-builder contract: None where no padding mask is given (causal and packed attention are
    the attention function's business, as for flash-attn), so no (T, T) mask is made for packed rows; SDPA's mask
    for padded batches and sliding windows, which the attention function hands to SDPA."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and local_size is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, local_size=local_size, **kwargs)


def register() -> None:
    """Make `attn_implementation="torch_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
