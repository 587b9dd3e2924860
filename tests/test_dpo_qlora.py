"""DPO with QLoRA (issue 13 point 2: `--method dpo --bits 4 --lora_enable True`) on bitsandbytes' CPU backend, through
`vlm.train.run.run`: the reference is the 4-bit start model with its adapters off (no second model), the loss falls,
the saved run loads.

Outside reference for the reference log-probs: transformers' own 4-bit load of the plain LLM folder
(`Qwen2ForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))`, bitsandbytes' real layers, no
vlm code), the start model's image features spliced in by hand, one plain full-logits forward per sequence.
Tolerance 1e-5 relative + 1e-5 absolute on (2B,) sums of ~10 log-probs (the same quantised weights, only the
reduction order differs). The plain LLM runs in train mode (it has no dropout: checked), i.e. through bitsandbytes'
training kernel (dequantise, fp32 matmul) as the policy and our reference do: on a CPU with AVX512-BF16 its eval-mode
inference kernel differs from that by up to 1.5e-4 relative (measured), and our reference keeps the 4-bit layers in
train mode (vlm.quantization.eval_mode).
"""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # the `vlm[qlora]` extra; installed in this environment

from transformers import BitsAndBytesConfig, Qwen2ForCausalLM, set_seed  # noqa: E402

from tests.test_dpo import dpo_flags, dpo_workspace  # noqa: E402
from vlm.data.preference import PreferenceCollator  # noqa: E402
from vlm.folders.load import load_pretrained_model  # noqa: E402
from vlm.train.arguments import parse_args  # noqa: E402
from vlm.train.config import RunConfig  # noqa: E402
from vlm.train.dpo import METRIC_NAMES, pair_log_probs  # noqa: E402
from vlm.train.model_setup import build_for_training  # noqa: E402
from vlm.train.run import run  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
QLORA = ("--bits", "4", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
         "--max_steps", "12", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--beta", "0.5",
         "--lr_scheduler_type", "constant", "--save_strategy", "no")


@pytest.fixture(scope="module")
def qlora_dpo(tmp_path_factory):
    """`train.py --method dpo --bits 4 --lora_enable True` on the synthetic pairs: (workspace, flags, RunResult)."""
    root = tmp_path_factory.mktemp("dpo_qlora")
    ws = dpo_workspace(root)
    flags = dpo_flags(ws, root / "out", *QLORA)
    return ws, flags, run(RunConfig.from_flags(flags))


def _pair_batch(dataset, n: int) -> tuple[list[dict], dict]:
    items = [dataset[i] for i in range(n)]
    return items, PreferenceCollator(dataset.tokenizer.pad_token_id)(items)


def _plain_answer_log_prob(llm, start, ids: torch.Tensor, labels: torch.Tensor, pixels) -> torch.Tensor:
    """log p(answer) of one sequence: the start model's image features spliced into the plain LLM's embeddings by
    hand, one full-logits forward."""
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids).clone()  # (T, D)
        if pixels is not None:
            features = start.mm_projector(start.vision_tower(pixels))  # (n, P, D)
            embeds[ids == start.vlm_config.image_token_id] = features.reshape(-1, features.shape[-1])
        logits = llm(inputs_embeds=embeds[None]).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t+1
    target = labels[1:]
    keep = target != -100
    return logp[keep].gather(1, target[keep, None]).sum()


def test_qlora_dpo_reference_is_the_4bit_start_model_with_adapters_off(qlora_dpo):
    ws, flags, result = qlora_dpo
    trainer, policy = result.trainer, result.model
    base = policy.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    # no second model: no frozen copy, and the only start values kept are the projector's (never the LLM's)
    assert trainer.ref_model is None and trainer._disable_adapters
    projector = {id(p) for p in base.mm_projector.parameters()}
    assert trainer._ref_start_values and all(id(p) in projector for p in trainer._ref_start_values)

    # the start model as train.py builds it (same flags, same seed): its projector is the one the run started from
    model_args, data_args, training_args = parse_args(flags)
    set_seed(training_args.seed)
    start, _, _ = build_for_training(model_args, data_args, training_args)
    start = start.get_base_model().eval()
    for p, start_value in trainer._ref_start_values.items():
        name = next(n for n, q in base.mm_projector.named_parameters() if q is p)
        assert torch.equal(start_value, start.mm_projector.get_parameter(name)), name
        assert not torch.equal(p, start_value), name  # the projector trained

    items, batch = _pair_batch(trainer.train_dataset, 4)
    reference, counts = trainer.reference_log_probs(batch)
    llm = Qwen2ForCausalLM.from_pretrained(ws["llm"], quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), device_map="cpu").train()  # no dropout: train mode is deterministic
    assert llm.config.attention_dropout == 0 and not any(isinstance(m, torch.nn.Dropout) for m in llm.modules())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules()) == 14
    expected = torch.stack([_plain_answer_log_prob(llm, start, item[f"{side}_input_ids"], item[f"{side}_labels"],
                                                   item["pixel_values"])
                            for side in ("chosen", "rejected") for item in items])
    torch.testing.assert_close(reference, expected, **TOL)
    assert counts.tolist() == [int((item[f"{side}_labels"][1:] != -100).sum())
                               for side in ("chosen", "rejected") for item in items]
    with torch.no_grad():
        trained, _ = pair_log_probs(policy.eval(), batch)
    assert not torch.allclose(trained, expected, rtol=1e-3, atol=1e-3)  # the policy did move away from it

    # the saved run loads (4-bit again) and scores the pairs as the trained model does
    _, loaded, _, _ = load_pretrained_model(result.output_dir, load_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    with torch.no_grad():
        reloaded, _ = pair_log_probs(loaded.eval(), batch)
    torch.testing.assert_close(reloaded, trained, **TOL)


def test_qlora_dpo_loss_falls_and_rewards_are_logged(qlora_dpo):
    _, _, result = qlora_dpo
    with open(f"{result.output_dir}/metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert len(rows) == 12 and all(name in row for row in rows for name in METRIC_NAMES)
    loss = [r["loss"] for r in rows]
    # the same 16 pairs every step; measured 0.696 -> 0.609 (Adam oscillates a little at a constant rate)
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.04, loss
