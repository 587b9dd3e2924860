"""On a CUDA GPU: `attn_implementation="torch_varlen"` (PyTorch's varlen flash kernel) against SDPA with
transformers' block-diagonal mask, on the same packed batch: loss, logits and gradients.

    python bench/varlen_check.py          # prints the relative differences; exits 1 past the tolerance

The CPU tests (tests/test_packing.py) check the varlen path's plumbing with a per-sample SDPA; this checks the
CUDA kernel itself. bf16 (the kernel has no float32): relative error ||a - b|| / ||b|| under 2e-2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SIZES, length_mix, load_models, packed, padded_batch, save_reference_folder  # noqa: E402


def main() -> int:
    import tempfile

    import torch

    from vlm.llm import varlen

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, varlen kernel: {varlen._KERNEL is not None}")
    s = SIZES["small"]
    image_token_id, num_image_tokens = s["vocab"] - 1, (s["image_size"] // s["patch"]) ** 2
    data = length_mix(12, vocab=s["vocab"], image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                      median=200, max_len=600)
    batch = packed(padded_batch(data, s["image_size"]), 1024, image_token_id, num_image_tokens)
    batch = {k: (v.to("cuda", torch.bfloat16) if k == "pixel_values" else v.to("cuda")) for k, v in batch.items()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_reference_folder(tmp, "small")
        for attn in ("sdpa", "torch_varlen"):
            model = load_models(tmp, "ours", attn).to("cuda", torch.bfloat16).train()
            out = model(**batch)
            out.loss.backward()
            model.eval()
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            results[attn] = (out.loss.float(), logits, grads)
    worst = 0.0
    for i, what in enumerate(("loss", "logits", "gradients")):
        a, b = results["torch_varlen"][i], results["sdpa"][i]
        rel = float((a - b).norm() / b.norm())
        worst = max(worst, rel)
        print(f"{what:<10} relative difference torch_varlen vs sdpa (block-diagonal mask): {rel:.2e}")
    print(f"rows x width {tuple(batch['input_ids'].shape)}; tolerance 2e-2: {'ok' if worst < 2e-2 else 'FAILED'}")
    return 0 if worst < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
