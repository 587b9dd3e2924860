"""On a CUDA GPU: `train.py` itself (the Trainer, the collators, the model's forward), bf16, padded SDPA against
packed `torch_varlen`, on a tiny model and the synthetic shapes set; the losses of both runs are printed, the
first steps' compared and the fall checked.

    python bench/gpu_train_check.py          # exits 1 when a run fails, the loss does not fall or the runs disagree

CPU tests cover the same flags (tests/test_packing.py); this is the check that the CUDA path runs end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    import torch

    from vlm.data.synth import generate_shapes_dataset
    from vlm.tiny import save_tiny_components

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    root = Path(tempfile.mkdtemp())
    data = generate_shapes_dataset(root / "data", n_train=256, n_eval=4, image_size=32, seed=0)
    records = json.loads(Path(data["train"]).read_text())
    texts = [turn["value"] for r in records for turn in r["conversations"]]
    llm, vision = save_tiny_components(root / "models", texts)
    losses = {}
    for name, extra in (("padded sdpa", []), ("packed torch_varlen", ["--padding_free", "--attn_implementation",
                                                                        "torch_varlen"])):
        out = root / name.replace(" ", "_")
        done = subprocess.run([sys.executable, "train.py", "--model_name_or_path", llm, "--vision_tower", vision,
                               "--data_path", data["train"], "--image_folder", data["image_folder"],
                               "--output_dir", str(out), "--report_to", "none", "--bf16", "True", "--seed", "0",
                               "--max_steps", "40", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
                               "--logging_steps", "1", "--save_strategy", "no", "--dataloader_num_workers", "2",
                               "--group_by_modality_length", "False", *extra], capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: train.py failed\n{done.stderr[-3000:]}")
            return 1
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(line)]
        config = json.loads((out / "config.json").read_text())
        l = losses[name]
        print(f"{name:<20} attn {config['attn_implementation']:<13} dtype {config.get('dtype')}  loss "
              f"{l[0]:.3f} -> {l[-1]:.3f} (first 3 {[round(x, 3) for x in l[:3]]})")
    a, b = losses["padded sdpa"], losses["packed torch_varlen"]
    falls = all(sum(l[-5:]) < 0.7 * sum(l[:5]) for l in (a, b))
    agree = abs(a[0] - b[0]) < 0.05 * abs(a[0])
    print(f"loss falls in both: {falls}; first-step losses agree within 5% (bf16): {agree}")
    return 0 if falls and agree else 1


if __name__ == "__main__":
    sys.exit(main())
