"""What the benchmarks share: the reference model (transformers' LLaVA) and ours with the same weights, the
LLaVA-665K-like length mix, process peak memory, the machine's load, and appending a result to RESULTS.md.

Both models come from one `LlavaForConditionalGeneration` built from a config with a fixed seed and saved as a
llava-hf folder; ours is that folder loaded by `vlm.load_pretrained_model` (the key map of `vlm/folders`), so the
weights are identical by construction (tests/test_convert.py checks the logits agree to 1e-5).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")

# Model sizes: "42m" is issue 12's measuring model (a 32K vocabulary and a small SigLIP tower); "small" runs in
# seconds for a smoke test.
SIZES = {
    "small": dict(vocab=4096, hidden=128, layers=2, heads=4, kv_heads=2, vision_hidden=64, vision_layers=2,
                  image_size=56, patch=14),
    "42m": dict(vocab=32000, hidden=512, layers=4, heads=8, kv_heads=4, vision_hidden=256, vision_layers=4,
                image_size=224, patch=14),
    # Issue 12's GPU model: Qwen2.5-0.5B's LLM shape (tied embeddings) behind a SigLIP-base-shaped tower (196
    # image tokens); random weights, for throughput and MFU only.
    "0.5b": dict(vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, tie=True,
                 vision_hidden=768, vision_layers=12, vision_heads=12, image_size=224, patch=16),
}


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mib() -> float:
    """This process's resident memory now (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """The highest resident memory seen while the block runs, sampled every `interval` s by a thread (the
    process-wide ru_maxrss would also count the model's load peak, which is not training memory)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0.0, None

    def __enter__(self) -> "PeakRss":
        import threading

        self._stop = threading.Event()
        self.peak = rss_mib()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, rss_mib())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def save_reference_folder(folder: str, size: str, seed: int = 0) -> None:
    """A llava-hf folder (config + random weights + a small tokenizer) for `size`; the image token is the last id."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    s = SIZES[size]
    vision = SiglipVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
                                num_hidden_layers=s["vision_layers"], num_attention_heads=s.get("vision_heads", 4),
                                image_size=s["image_size"], patch_size=s["patch"], vision_use_head=False)
    text = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"],
                       intermediate_size=s.get("intermediate", 4 * s["hidden"]), num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       max_position_embeddings=4096, tie_word_embeddings=s.get("tie", False))
    num_image_tokens = (s["image_size"] // s["patch"]) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=s["vocab"] - 1,
                         vision_feature_select_strategy="full", vision_feature_layer=-2,
                         image_seq_length=num_image_tokens)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)


def load_models(folder: str, which: str, attn_implementation: str = "sdpa"):
    """('ours' | 'reference') -> the model, float32, with the attention backend asked for."""
    if which == "reference":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn_implementation)
    from vlm.folders.llava_hf import load_llava_hf

    return load_llava_hf(folder, attn_implementation=attn_implementation)


def training_flops(size: str, examples: list["Example"]) -> float:
    """Model FLOPs of one training step on `examples` (the PaLM-paper convention used for MFU: what the model
    needs, not what an implementation happens to run): per LLM token 6 x (decoder matmul parameters + the LM
    head); causal attention 12 x layers x hidden x n(n+1)/2 per sample of n tokens (QK^T and AV, forward and
    backward, each sample attending only to itself); the frozen vision tower forward only (2 x parameters per patch, plus its full attention); the
    projector trained (6 x parameters per image token). Embedding lookups and norms are left out."""
    s = SIZES[size]
    d, L, vocab = s["hidden"], s["layers"], s["vocab"]
    inter = s.get("intermediate", 4 * d)
    head_dim = d // s["heads"]
    kv = s["kv_heads"] * head_dim
    layer = d * d + 2 * d * kv + d * d + 3 * d * inter  # q, k, v, o, gate/up/down
    per_token = 6 * (L * layer + d * vocab)
    vd, vL = s["vision_hidden"], s["vision_layers"]
    patches = (s["image_size"] // s["patch"]) ** 2
    vision_image = 2 * patches * vL * (4 * vd * vd + 8 * vd * vd) + 4 * vL * vd * patches * patches
    projector_token = 6 * (vd * d + d * d)
    flops = 0.0
    for e in examples:
        n = len(e.input_ids)
        flops += n * per_token + 12 * L * d * n * (n + 1) / 2
        if e.has_image:
            flops += vision_image + patches * projector_token
    return flops


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    has_image: bool


def length_mix(n: int, *, vocab: int, image_token_id: int, num_image_tokens: int, seed: int = 0,
               median: int = 372, max_len: int = 1024, image_share: float = 0.8) -> list[Example]:
    """`n` samples shaped like LLaVA-665K: 80% with one image, total length log-normal around `median` tokens
    (image tokens included), a prompt of 20-40% of the text unsupervised, the rest an answer (supervised)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        has_image = rng.random() < image_share
        total = min(max_len, max(int(rng.lognormvariate(0, 0.5) * median), 48))
        text = max(total - (num_image_tokens if has_image else 0), 16)
        prompt = int(text * rng.uniform(0.2, 0.4))
        ids = [rng.randrange(10, image_token_id) for _ in range(text)]
        image = [image_token_id] * num_image_tokens if has_image else []
        input_ids = ids[:2] + image + ids[2:]
        labels = [-100] * (2 + len(image) + prompt) + ids[2 + prompt:]
        out.append(Example(input_ids, labels, has_image))
    return out


def padded_batch(examples: list[Example], image_size: int, pad_id: int = 0) -> dict:
    """The usual right-padded batch: input_ids/labels/attention_mask (B, T) and pixel_values (N, 3, H, W)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.input_ids)] = 1
    n_images = sum(e.has_image for e in examples)
    gen = torch.Generator().manual_seed(len(examples) * 1000 + width)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if n_images:
        batch["pixel_values"] = torch.randn(n_images, 3, image_size, image_size, generator=gen)
    return batch


def packed(batch: dict, pack_length: int, image_token_id: int, num_image_tokens: int) -> dict:
    """The padded batch's samples packed into rows (`PackingCollator`), each sample with its own images."""
    from vlm.data.collate import PackingCollator

    features, first = [], 0
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        images = int((ids[:n] == image_token_id).sum()) // num_image_tokens
        pixels = batch["pixel_values"][first:first + images] if images else None
        features.append({"input_ids": ids[:n], "labels": labels[:n], "pixel_values": pixels})
        first += images
    return PackingCollator(pad_token_id=0, max_length=pack_length)(features)


def summarise(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def append_result(title: str, command: str, table: list[str], notes: list[str] = ()) -> None:
    """Add one result (title, the exact command, the machine and its load, a markdown table) to RESULTS.md."""
    import torch

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n## {title} ({when})", "", f"    {command}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"Python {sys.version.split()[0]}; load (1/5/15 min) at the end {load_average()}.", "", *table]
    lines += ["", *notes] if notes else []
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def emit(result: dict) -> None:
    """A worker's one line of output, read by the driver."""
    print("RESULT " + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker printed no RESULT line:\n{stdout[-2000:]}")
