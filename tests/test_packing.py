"""Padding-free packing (vlm.data.collate.PackingCollator, `--packing`, issue 12 point 2).

A packed batch gives each sample the logits, loss terms and gradients it gets when run alone (float32; logits
and loss within 1e-5, gradients within 1e-5 relative + 1e-6 absolute: the attention sums run over other shapes),
with SDPA and eager attention, on Qwen2 and LLaMA, also when the model's config says `use_cache=True` (the case
where transformers would otherwise skip its block-diagonal mask). Changing one sample changes no other sample's
logits. Through `train.py`: packed + gradient accumulation ends at the same weights as the padded large batch,
with `--group_by_modality_length`, with LoRA and in stage 1; under torchrun (2 processes) as the padded single
process; and the loss goes down.
"""

from __future__ import annotations

import sys

import pytest
import torch

import vlm
from tests.inference_helpers import tiny_model, tiny_tokenizer
from vlm.data.collate import DataCollator, PackingCollator
from vlm.tiny import tiny_vlm_config

TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def _model(llm: str, attn: str):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_vlm_config("siglip", llm, vocab_size=len(tokenizer))
    config.llm.hf_config["tie_word_embeddings"] = False
    return vlm.build_model(config, tokenizer=tokenizer, attn_implementation=attn)


def _samples(model, lengths=((12, 1), (20, 0), (9, 2), (15, 1)), seed: int = 0) -> list[dict]:
    """Samples of (text tokens, images) with an answer span and the first token labelled; images after token 1."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.vlm_config
    size = cfg.vision.hf_config["image_size"]
    out = []
    for text, images in lengths:
        ids = torch.randint(10, model.config.vocab_size, (text,), generator=g)
        ids[ids == cfg.image_token_id] = 11
        ids = torch.cat([ids[:1], torch.full((images * cfg.num_image_tokens,), cfg.image_token_id), ids[1:]])
        labels = torch.full_like(ids, -100)
        labels[-text // 2:] = ids[-text // 2:]
        labels[0] = ids[0]  # never a target alone; packed, it would be the previous sample's last target
        pixels = torch.randn(images, 3, size, size, generator=g) if images else None
        out.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _one_by_one(model, samples, num_items: int):
    """Each sample alone (batch of one): its logits, and loss and gradients summed over the samples."""
    model.zero_grad(set_to_none=True)
    logits, loss = [], 0.0
    for s in samples:
        batch = DataCollator(pad_token_id=0)([s])
        out = model(**batch, num_items_in_batch=torch.tensor(num_items))
        out.loss.backward()
        loss += out.loss.item()
        with torch.no_grad():
            model.eval()
            logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0])
            model.train()
    return logits, loss, _grads(model)


def _packed_logits(model, batch: dict, rows: list[list[int]], samples) -> list[torch.Tensor]:
    """Each sample's logits cut out of the packed rows, in sample order."""
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    out = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = samples[i]["input_ids"].numel()
            out[i] = logits[r, start:start + n]
            start += n
    return [out[i] for i in range(len(samples))]


@pytest.mark.parametrize("llm,attn", [("qwen2", "sdpa"), ("qwen2", "eager"), ("llama", "sdpa"),
                                      ("qwen2", "torch_varlen"), ("llama", "torch_varlen")])
def test_packed_batch_equals_the_samples_one_by_one(llm, attn):
    model = _model(llm, attn)
    assert model.config.use_cache and model.config._attn_implementation == attn
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    samples = _samples(model)
    collator = PackingCollator(pad_token_id=0, max_length=model.vlm_config.num_image_tokens * 2 + 30)
    batch = collator(samples)
    rows = collator.rows([s["input_ids"].numel() for s in samples])
    assert len(rows) == 2 and "attention_mask" not in batch  # two rows: padding tail on one, several samples each
    num_items = sum(int((s["labels"][1:] != -100).sum()) for s in samples)

    logits, loss, grads = _one_by_one(model, samples, num_items)
    model.zero_grad(set_to_none=True)
    packed = model(**batch, num_items_in_batch=torch.tensor(num_items))
    packed.loss.backward()
    for i, (alone, in_row) in enumerate(zip(logits, _packed_logits(model, batch, rows, samples))):
        torch.testing.assert_close(in_row, alone, **TOL, msg=f"sample {i}")
    torch.testing.assert_close(packed.loss.item(), loss, **TOL)
    packed_grads = _grads(model)
    assert packed_grads.keys() == grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], **GRAD_TOL, msg=name)
    # The mean (no num_items_in_batch) is over every supervised token of the packed batch, as the padded batch's.
    padded = model(**DataCollator(pad_token_id=0)(samples)).loss
    torch.testing.assert_close(model(**batch).loss, padded, **TOL)


def test_torch_varlen_attends_from_sample_boundaries_without_a_mask():
    """`torch_varlen` (vlm.llm.varlen): every decoder attention of a packed batch gets the samples' boundaries
    (FlashAttentionKwargs) and no (T, T) mask; a padded batch gets SDPA's mask and no boundaries."""
    model = _model("qwen2", "torch_varlen")
    samples = _samples(model)
    collator = PackingCollator(pad_token_id=0, max_length=model.vlm_config.num_image_tokens * 2 + 30)
    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
             for layer in model.model.layers]
    batch = collator(samples)
    model(**batch)
    rows, width = batch["input_ids"].shape
    lengths = [s["input_ids"].numel() for s in samples]
    ends = []
    for r, row in enumerate(collator.rows(lengths)):
        start = r * width
        for i in row:
            ends.append(start + lengths[i])
            start += lengths[i]
        if start < (r + 1) * width:  # the row's padding tail: a run of its own
            ends.append((r + 1) * width)
    assert len(seen) == len(model.model.layers)
    for kw in seen:
        assert kw["attention_mask"] is None
        assert kw["cu_seq_lens_q"].tolist() == [0] + sorted(ends) and kw["max_length_q"] == max(lengths)
    seen.clear()
    model(**DataCollator(pad_token_id=0)(samples))
    assert all("cu_seq_lens_q" not in kw and kw["attention_mask"] is not None for kw in seen)
    for h in hooks:
        h.remove()


def test_torch_varlen_reads_packed_positions_given_without_boundaries(monkeypatch):
    """Packed position ids passed straight to the decoder (not through the mixin, so no boundaries): the attention
    finds the samples from the positions, as transformers' flash-attn path does, and equals SDPA's block mask;
    the positions are scanned once per forward, not once per layer."""
    from vlm.llm import varlen

    scans = []
    scan = varlen._scan_for_restarts
    monkeypatch.setattr(varlen, "_scan_for_restarts", lambda p: scans.append(1) or scan(p))
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (1, 23))
    position_ids = torch.tensor([list(range(9)) + list(range(14))])
    hidden = {}
    for attn in ("sdpa", "torch_varlen"):
        model = _model("llama", attn).eval()
        with torch.no_grad():
            hidden[attn] = model.model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden["torch_varlen"], hidden["sdpa"], **TOL)
    assert len(model.model.layers) > 1 and len(scans) == 1


def test_no_token_attends_across_a_sample_boundary():
    model, _, _ = tiny_model()
    samples = _samples(model, lengths=((10, 1), (14, 0), (8, 1)))
    collator = PackingCollator(pad_token_id=0, max_length=1000)
    rows = collator.rows([s["input_ids"].numel() for s in samples])
    assert rows == [[0, 1, 2]]  # one row
    before = _packed_logits(model, collator(samples), rows, samples)
    changed = [dict(s) for s in samples]
    changed[1]["input_ids"] = samples[1]["input_ids"].flip(0)  # sample 1: other tokens, same length
    changed[0]["pixel_values"] = samples[0]["pixel_values"] + 1  # sample 0: another image
    after = _packed_logits(model, collator(changed), rows, changed)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=1e-6)  # after both, untouched
    changed = [dict(s) for s in samples]
    changed[2]["input_ids"] = samples[2]["input_ids"].flip(0)
    after = _packed_logits(model, collator(changed), rows, changed)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-6)  # before it, untouched (causal and masked)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-6)


def test_rows_positions_labels_and_images():
    def feature(n, fill, images=0):
        ids = torch.arange(n) + 100 * fill
        return {"input_ids": ids, "labels": ids.clone(), "pixel_values": torch.full((images, 3, 2, 2), float(fill))
                if images else None}

    features = [feature(3, 1, images=1), feature(6, 2), feature(4, 3, images=2), feature(2, 4, images=1)]
    collator = PackingCollator(pad_token_id=0, max_length=8)
    # first fit, longest first: 6 -> row 0; 4 -> row 1; 3 -> row 1; 2 -> row 0; each row in sample order
    assert collator.rows([3, 6, 4, 2]) == [[1, 3], [0, 2]]
    batch = collator(features)
    assert batch["input_ids"].tolist() == [[200, 201, 202, 203, 204, 205, 400, 401],
                                           [100, 101, 102, 300, 301, 302, 303, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 201, 202, 203, 204, 205, -100, 401],
                                        [-100, 101, 102, -100, 301, 302, 303, -100]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [4.0, 1.0, 3.0, 3.0]  # images in the rows' order
    # a sample longer than a row gets a row of its own, never cut
    assert PackingCollator(0, max_length=4).rows([3, 6, 1]) == [[1], [0, 2]]
    # as few rows as first fit, filled evenly: first fit's rows would be 1024+504+272 | 262, 1800 wide (43% padding)
    assert PackingCollator(0, max_length=2048).rows([1024, 272, 262, 504]) == [[0], [1, 2, 3]]  # 1038 wide
    assert PackingCollator(0, max_length=7).rows([3, 3, 2, 2, 2, 2]) == [[0, 4], [1, 5], [2, 3]]  # not 6 | 6 | 2
    # where the even fill does not fit (5 | 4+3, then 2 to the first, the last 2 fits nowhere): first fit's rows
    assert PackingCollator(0, max_length=8).rows([5, 2, 4, 2, 3]) == [[0, 4], [1, 2, 3]]
    assert "labels" not in collator([{"input_ids": torch.arange(3)}])


def test_flash_attention_runs_packed_rows_as_one_row():
    """flash-attn's varlen path reads packed position ids only in a batch of one row: the model joins the rows.
    Checked with SDPA (no flash-attn on CPU): the joined forward gives the rows' logits and loss."""
    model, _, _ = tiny_model()
    samples = _samples(model)
    batch = PackingCollator(pad_token_id=0, max_length=model.vlm_config.num_image_tokens * 2 + 30)(samples)
    model.eval()
    with torch.no_grad():
        rows = model(**batch)
        embeds = model.embed_multimodal(batch["input_ids"], batch["pixel_values"])
        joined = model._forward_as_one_row(embeds, batch["position_ids"], batch["labels"], {})
    assert batch["input_ids"].shape[0] == 2 and joined.logits.shape == rows.logits.shape
    torch.testing.assert_close(joined.logits, rows.logits, **TOL)
    torch.testing.assert_close(joined.loss, rows.loss, **TOL)


# --- through train.py: gradient accumulation, --group_by_modality_length, LoRA, stage 1, the loss going down

from safetensors.torch import load_file  # noqa: E402

from tests.test_train import base_flags, workspace  # noqa: E402,F401  (workspace: a fixture)
from vlm.cli.train import main as train_main  # noqa: E402


@pytest.mark.parametrize("extra,padded_loss,packed_loss", [
    ((), "full", "supervised"),
    (("--group_by_modality_length", "True"), "supervised", "full"),
    (("--lora_enable", "True", "--lora_r", "4", "--lora_dropout", "0"), "full", "supervised"),
    (("--tune_mm_mlp_adapter", "True"), "full", "supervised")],
    ids=["plain", "grouped", "lora", "stage1"])
def test_packed_accumulation_ends_where_the_padded_large_batch_does(workspace, tmp_path, extra, padded_loss,
                                                                    packed_loss):
    """Loss normalised over all supervised tokens of the window: 2 packed micro-batches of 4 samples step exactly
    as one padded batch of 8 (SGD, 2 steps, float32), whichever loss path each side takes."""
    flags = ("--max_steps", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--optim", "sgd",
             *extra)
    train_main(base_flags(workspace, tmp_path / "padded", *flags, "--per_device_train_batch_size", "8",
                          "--supervised_only_loss", str(padded_loss == "supervised")))
    train_main(base_flags(workspace, tmp_path / "packed", *flags, "--per_device_train_batch_size", "4",
                          "--gradient_accumulation_steps", "2", "--packing", "True",
                          "--supervised_only_loss", str(packed_loss == "supervised")))
    a, b = (_saved_tensors(tmp_path / run) for run in ("padded", "packed"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor the run saved (the model, or a LoRA run's adapter and other trained weights), by file and key."""
    return {f"{f.name}:{key}": value for f in sorted(folder.glob("*.safetensors"))
            for key, value in load_file(f).items()}


@pytest.mark.parametrize("attn", ["sdpa", "torch_varlen"])
def test_packed_training_run_learns(workspace, tmp_path, attn):
    import json

    out = tmp_path / "run"
    train_main(base_flags(workspace, out, "--max_steps", "12", "--learning_rate", "3e-3", "--padding_free",
                          "--per_device_train_batch_size", "4", "--model_max_length", "256",
                          "--attn_implementation", attn))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # measured: 0.83
    assert json.loads((out / "config.json").read_text())["attn_implementation"] == attn  # the flag reached the model


@pytest.mark.parametrize("attn", ["sdpa", "torch_varlen"])
def test_packed_under_torchrun_equals_the_padded_single_process(workspace, tmp_path, attn):
    """DDP, 2 processes (gloo): each rank packs its 2 samples; the update equals one process's padded batch of 4
    (SDPA). Sequential order, so one rank's batch may hold no image while the other's does."""
    from tests.test_train import _run

    flags = ("--max_steps", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--optim", "sgd",
             "--train_sampling_strategy", "sequential")
    single = _run([sys.executable, "train.py", *base_flags(workspace, tmp_path / "one", *flags,
                                                           "--per_device_train_batch_size", "4")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                *base_flags(workspace, tmp_path / "two", *flags, "--per_device_train_batch_size", "2", "--packing",
                            "--attn_implementation", attn)])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _saved_tensors(tmp_path / "one"), _saved_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
