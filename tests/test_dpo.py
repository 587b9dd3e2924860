"""DPO (issue 13 points 2 and 3): pair tokenisation, log-probabilities, the loss against TRL's own code, the reference
model, gradient accumulation, and a run through `vlm.train.run.run`.

Tolerances (float32 throughout):
- batched 2B-row answer log-probs vs each side run alone with full logits: 1e-5 relative + 1e-5 absolute (values
  are sums of ~10 log-probs of magnitude ~6; only the reduction order and the padded batch's matmul shapes
  differ; measured ~1e-6);
- loss and gradient vs TRL 1.16's `DPOTrainer._compute_loss` on the same per-token log-probs: 1e-6 relative +
  1e-7 absolute (the same float operations up to order);
- accumulation and DDP updates vs one large batch: 1e-5 relative + 1e-6 absolute on the final weights (the
  supervised tests' bound).
"""

from __future__ import annotations

import copy
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.inference_helpers import tiny_model, tiny_tokenizer
from vlm.data.paths import ImageFolder
from vlm.data.preference import PAIR_INDEX_KEY, PreferenceCollator, encode_pair, final_reply_labels
from vlm.train.dpo import DPOSettings, DPOTrainer, chosen_nll, dpo_loss, dpo_losses, pair_log_probs

TEMPLATE = "chatml"


def _image(path: Path, color) -> str:
    Image.new("RGB", (40, 32), color).save(path)
    return path.name


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[list[dict], str]:
    """Preference samples (two with an image, one text-only, one multi-turn) and their image folder."""
    folder = tmp_path_factory.mktemp("dpo_images")
    red, blue = _image(folder / "red.png", (220, 40, 40)), _image(folder / "blue.png", (40, 40, 220))
    samples = [
        {"id": "a", "images": [red], "messages": [{"role": "user", "content": "<image>\nWhat color is the circle?"}],
         "chosen": "red", "rejected": "blue blue"},
        {"id": "b", "images": [blue], "messages": [{"role": "user", "content": "<image>\nWhat shape is it?"}],
         "chosen": "circle", "rejected": "a square, not a circle"},
        {"id": "c", "images": [], "messages": [{"role": "user", "content": "How many shapes are there?"}],
         "chosen": "3", "rejected": "2 shapes"},
        {"id": "d", "images": [red], "messages": [
            {"role": "user", "content": "<image>\nIs there a blue square?"}, {"role": "assistant", "content": "no"},
            {"role": "user", "content": "What color is the circle?"}], "chosen": "red", "rejected": "yellow"},
    ]
    return samples, str(folder)


@pytest.fixture(scope="module")
def model_parts():
    tokenizer = tiny_tokenizer()
    model, tokenizer, processor = tiny_model(tokenizer=tokenizer, seed=0)
    return model, tokenizer, processor


class PairList(torch.utils.data.Dataset):
    """Encoded pairs as `PreferenceDataset` returns them, for trainers built directly in these tests."""

    def __init__(self, samples, folder, tokenizer, processor, num_image_tokens):
        from vlm.data.templates import get_template

        template = get_template(TEMPLATE, tokenizer)
        self.items = []
        for i, sample in enumerate(samples):
            pair = encode_pair(sample, ImageFolder(folder), tokenizer, template, num_image_tokens=num_image_tokens)
            images = pair.pop("images")
            pair["pixel_values"] = processor(images, return_tensors="pt")["pixel_values"] if images else None
            pair[PAIR_INDEX_KEY] = i
            self.items.append(pair)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _batch(samples, folder, model, tokenizer, processor) -> dict:
    data = PairList(samples, folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    return PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])


# -- pair tokenisation -----------------------------------------------------------------------------------------

def test_only_the_final_reply_is_supervised(pairs, model_parts):
    samples, folder = pairs
    model, tokenizer, processor = model_parts
    data = PairList(samples, folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    for sample, item in zip(samples, data.items):
        for side in ("chosen", "rejected"):
            labels = item[f"{side}_labels"]
            supervised = labels[labels != -100].tolist()
            # the answer and the end-of-turn token that closes it, nothing of the prompt (nor the earlier "no")
            assert tokenizer.decode(supervised) == sample[side] + "<|im_end|>", (sample["id"], side)
            assert item[f"{side}_input_ids"][labels != -100].tolist() == supervised
    assert final_reply_labels([-100, 5, 6, -100, -100, 7, 8, -100]) == [-100] * 5 + [7, 8, -100]


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "chatml", "llama3"])
def test_final_reply_only_for_every_chat_template(template):
    from vlm.data.errors import SampleError
    from vlm.data.templates import get_template

    tokenizer = tiny_tokenizer()
    sample = {"id": "m", "images": [], "chosen": "red", "rejected": "yellow", "messages": [
        {"role": "user", "content": "Is there a blue square?"}, {"role": "assistant", "content": "no"},
        {"role": "user", "content": "What color is the circle?"}]}
    end = {"vicuna_v1": "</s>", "llava_v1": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    space = " " if template.endswith("_v1") else ""  # vicuna supervises the space after "ASSISTANT:" (LLaVA)
    pair = encode_pair(sample, ImageFolder(None), tokenizer, get_template(template, tokenizer), num_image_tokens=4)
    for side in ("chosen", "rejected"):
        labels = pair[f"{side}_labels"]
        assert tokenizer.decode(labels[labels != -100].tolist()) == space + sample[side] + end
    # `plain` writes the replies back to back: the final one cannot be told apart, so the pair is refused
    with pytest.raises(SampleError, match="final reply") as caught:
        encode_pair(sample, ImageFolder(None), tokenizer, get_template("plain", tokenizer), num_image_tokens=4)
    assert caught.value.reason == "template_mismatch"


def test_collator_puts_chosen_rows_then_rejected_and_each_image_once(pairs, model_parts):
    samples, folder = pairs
    model, tokenizer, processor = model_parts
    batch = _batch(samples, folder, model, tokenizer, processor)
    b = len(samples)
    assert batch["input_ids"].shape[0] == 2 * b and batch[PAIR_INDEX_KEY].tolist() == list(range(b))
    assert batch["pixel_values"].shape[0] == 3  # a, b, d: once each, not once per side
    n_image = (batch["input_ids"] == model.vlm_config.image_token_id).sum(dim=1)
    assert torch.equal(n_image[:b], n_image[b:])


# -- log-probabilities ---------------------------------------------------------------------------------------

def _alone(model, ids: torch.Tensor, labels: torch.Tensor, pixels) -> torch.Tensor:
    """log p(answer) of one sequence run alone through the model's full-logits forward."""
    logits = model(input_ids=ids[None], pixel_values=pixels).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t+1
    target = labels[1:]
    keep = target != -100
    return logp[keep].gather(1, target[keep, None]).sum()


@pytest.mark.parametrize("supervised_only", [True, False], ids=["answer_positions_only", "full_logits"])
def test_batched_pair_log_probs_equal_each_sequence_alone(pairs, model_parts, supervised_only):
    """Both ways the model scores answers (the head at the answer positions only, the default; every position
    with --supervised_only_loss False) equal each side run alone with full logits."""
    samples, folder = pairs
    model, tokenizer, processor = model_parts
    data = PairList(samples, folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    batch = PreferenceCollator(tokenizer.pad_token_id)(data.items)
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model.supervised_only_loss = supervised_only
    try:
        with torch.no_grad():
            logps, counts = pair_log_probs(model, batch)
    finally:
        hook.remove()
        model.supervised_only_loss = True
    assert calls == [3]  # one vision forward for the 3 images of 8 rows
    expected, expected_counts = [], []
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            for item in data.items:
                ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
                expected.append(_alone(model, ids, labels, item["pixel_values"]))
                expected_counts.append(int((labels[1:] != -100).sum()))
    torch.testing.assert_close(logps, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts


# -- the loss against TRL --------------------------------------------------------------------------------------

def _trl_loss(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_chosen, ref_rejected, *, beta: float,
              loss_types: list[str], loss_weights: list[float] | None = None, label_smoothing: float = 0.0):
    """TRL 1.16's `DPOTrainer._compute_loss`, run on a stand-in model that returns `per_token` (2B, T-1) as the
    per-token log-probs (zero outside the completion, as TRL's fused head does for labels -100)."""
    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

    t = per_token.shape[1] + 1
    shift_mask = completion_mask[:, 1:]
    outputs = types.SimpleNamespace(log_probs=per_token * shift_mask, entropy=torch.zeros_like(per_token),
                                    mean_logits=torch.zeros_like(per_token),
                                    is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)
    fake_model = lambda **kwargs: outputs  # noqa: E731  (TRL calls model(**inputs, labels=..., fused_lm_head=True))
    trainer = TRLDPOTrainer.__new__(TRLDPOTrainer)
    identity = lambda x: x  # noqa: E731  (one process)
    trainer.__dict__.update(
        model=model, accelerator=types.SimpleNamespace(device=per_token.device, gather=identity,
                                                       gather_for_metrics=identity),
        beta=beta, precompute_ref_logps=True, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None, f_divergence_type="reverse_kl",
        label_smoothing=label_smoothing, use_weighting=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace())
    inputs = {"input_ids": torch.ones(per_token.shape[0], t, dtype=torch.long), "attention_mask": completion_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(fake_model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _fixed_logps(b: int = 4, t: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_token = (-torch.rand(2 * b, t - 1, generator=g) * 3).requires_grad_(True)  # (2B, T-1)
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for row in range(2 * b):  # answers of different lengths, after a prompt
        start = 2 + row % 3
        completion[row, start:start + 2 + (row * 5) % 6] = 1
    ref_chosen, ref_rejected = -torch.rand(b, generator=g) * 12, -torch.rand(b, generator=g) * 12
    return per_token, completion, ref_chosen, ref_rejected


def _ours(per_token, completion, ref_chosen, ref_rejected, settings: DPOSettings):
    b = ref_chosen.shape[0]
    shift = completion[:, 1:]
    logps, counts = (per_token * shift).sum(dim=1), shift.sum(dim=1)
    return dpo_loss(logps[:b], logps[b:], ref_chosen, ref_rejected, settings,
                    chosen_num_tokens=counts[:b], rejected_num_tokens=counts[b:])


@pytest.mark.parametrize("settings, trl", [
    (DPOSettings(beta=0.1), dict(loss_types=["sigmoid"])),
    (DPOSettings(beta=0.5, loss_type="ipo"), dict(loss_types=["ipo"])),
    (DPOSettings(beta=0.1, loss_type="robust", label_smoothing=0.2), dict(loss_types=["robust"], label_smoothing=0.2)),
    (DPOSettings(beta=0.1, rpo_alpha=0.7), dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.7])),
], ids=["sigmoid", "ipo", "robust_label_smoothing", "rpo_alpha"])
def test_loss_and_gradient_equal_trl(settings, trl):
    per_token, completion, ref_chosen, ref_rejected = _fixed_logps()
    loss, chosen_rewards, rejected_rewards = _ours(per_token, completion, ref_chosen, ref_rejected, settings)
    (ours_grad,) = torch.autograd.grad(loss, per_token)
    theirs, metrics = _trl_loss(per_token, completion, ref_chosen, ref_rejected, beta=settings.beta, **trl)
    (theirs_grad,) = torch.autograd.grad(theirs, per_token)
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-7)
    assert ours_grad.abs().sum() > 0
    # the rewards TRL logs, from the same numbers
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-6)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    assert accuracy == pytest.approx(metrics["rewards/accuracies"][0])


def test_cdpo_label_smoothing_equals_trl_and_the_published_formula():
    """cDPO (sigmoid with label smoothing ε): −(1−ε) log σ(βΔ) − ε log σ(−βΔ). TRL 1.16's `sigmoid` no longer takes ε;
    its `aot_unpaired` computes exactly this form on the chosen and rejected log-ratios after sorting each, so on
    pairs whose two log-ratio columns are already in the same ascending order (checked) it is the cDPO loss."""
    per_token, completion, ref_chosen, ref_rejected = _fixed_logps(seed=3)
    b, eps, beta = 4, 0.25, 0.3
    shift = completion[:, 1:]
    with torch.no_grad():  # make both log-ratio columns ascending in the same pair order
        logps = (per_token * shift).sum(dim=1)
        ref_chosen = logps[:b] - torch.tensor([-2.0, -0.5, 1.0, 2.5])
        ref_rejected = logps[b:] - torch.tensor([-1.0, 0.0, 0.5, 3.0])
    settings = DPOSettings(beta=beta, label_smoothing=eps)
    loss, _, _ = _ours(per_token, completion, ref_chosen, ref_rejected, settings)
    (ours_grad,) = torch.autograd.grad(loss, per_token)
    theirs, _ = _trl_loss(per_token, completion, ref_chosen, ref_rejected, beta=beta, loss_types=["aot_unpaired"],
                          label_smoothing=eps)
    (theirs_grad,) = torch.autograd.grad(theirs, per_token)
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-7)
    # the published formula, written out on the same numbers
    with torch.no_grad():
        logps = (per_token * shift).sum(dim=1)
        delta = (logps[:b] - ref_chosen) - (logps[b:] - ref_rejected)
        assert sorted((logps[:b] - ref_chosen).tolist()) == (logps[:b] - ref_chosen).tolist()
        expected = (-(1 - eps) * torch.log(torch.sigmoid(beta * delta))
                    - eps * torch.log(torch.sigmoid(-beta * delta))).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    # and ε = 0 is plain DPO, ε > 0 a different loss
    plain, _, _ = dpo_losses(logps[:b], logps[b:], ref_chosen, ref_rejected, beta=beta)
    assert not torch.allclose(plain.mean(), loss.detach())


def test_chosen_nll_is_the_mean_token_nll():
    logps, counts = torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])
    assert chosen_nll(logps, counts).item() == pytest.approx(2.0)


# -- the reference model ---------------------------------------------------------------------------------------

def _more_pairs(samples: list[dict]) -> list[dict]:
    """Eight pairs: the fixture's four and the same prompts with the answers' roles swapped."""
    swapped = [{**s, "id": s["id"] + "_swapped", "chosen": s["rejected"], "rejected": s["chosen"]} for s in samples]
    return samples + swapped


def _trainer(tmp_path, model, tokenizer, data, *, lora: bool = False, **flags) -> DPOTrainer:
    from vlm.train.arguments import VLMTrainingArguments

    settings = {**dict(output_dir=str(tmp_path), method="dpo", use_cpu=True, report_to="none", seed=0, max_steps=3,
                       per_device_train_batch_size=4, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                       logging_steps=1, save_strategy="no", dataloader_num_workers=0,
                       train_sampling_strategy="sequential", lora_enable=lora), **flags}
    args = VLMTrainingArguments(**settings)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=PreferenceCollator(tokenizer.pad_token_id), lora=lora,
                      dpo=DPOSettings.from_args(args))


def _fresh(tokenizer):
    model, _, _ = tiny_model(tokenizer=tokenizer, seed=1)
    return model


@pytest.mark.parametrize("adapters", ["new", "trained"])
def test_lora_reference_is_the_start_model_and_no_second_model(pairs, model_parts, tmp_path, adapters):
    """New adapters: the reference is the model with its adapters disabled and the projector at its start values.
    Adapters that start trained (--lora_weight_path) belong to the start model: their start values are used."""
    from vlm.folders.lora import apply_lora

    samples, folder = pairs
    _, tokenizer, processor = model_parts
    model = _fresh(tokenizer)
    model.mm_projector.requires_grad_(True)
    # trained adapters with dropout: the reference forward must not drop anything (eval mode)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0 if adapters == "new" else 0.5)
    if adapters == "trained":
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    start = copy.deepcopy(peft_model).eval()  # the test's own copy, to compare with
    data = PairList(_more_pairs(samples), folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    trainer = _trainer(tmp_path, peft_model, tokenizer, data, lora=True)
    assert trainer.ref_model is None  # no second model
    names = {n for n, p in peft_model.named_parameters() if any(p is q for q in trainer._ref_start_values)}
    kept = {n for n in names if ".mm_projector." not in n}
    assert any(".mm_projector." in n for n in names)
    # only the projector's start values are kept (and the adapters' when they start trained), never the LLM's
    assert kept == (set() if adapters == "new" else {n for n, _ in peft_model.named_parameters() if "lora_" in n})
    trainer.train()
    batch = PreferenceCollator(tokenizer.pad_token_id)(data.items[:4])
    with torch.no_grad():
        reference, _ = trainer.reference_log_probs(batch)
        expected, _ = pair_log_probs(start, batch)
        policy, _ = pair_log_probs(peft_model, batch)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, expected, rtol=1e-3, atol=1e-3)  # the adapters and the projector did train
    projector = dict(peft_model.get_base_model().mm_projector.named_parameters())
    assert not torch.equal(projector["0.weight"], start.mm_projector.state_dict()["0.weight"])  # restored after


def test_full_weight_reference_is_a_frozen_copy_of_the_start_model(pairs, model_parts, tmp_path):
    samples, folder = pairs
    _, tokenizer, processor = model_parts
    model = _fresh(tokenizer)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = PairList(_more_pairs(samples), folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    trainer = _trainer(tmp_path, model, tokenizer, data)
    assert trainer.ref_model is not None and not trainer.ref_model.training
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()
    for key, value in trainer.ref_model.state_dict().items():
        assert torch.equal(value, start[key]), key
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_precomputed_reference_equals_on_the_fly_and_is_reused(pairs, model_parts, tmp_path, capsys):
    from vlm.train.dpo import REF_LOG_PROBS_FILE

    samples, folder = pairs
    _, tokenizer, processor = model_parts
    model = _fresh(tokenizer)
    data = PairList(_more_pairs(samples), folder, tokenizer, processor, model.vlm_config.num_image_tokens)
    start = copy.deepcopy(model).eval()
    trainer = _trainer(tmp_path, model, tokenizer, data, precompute_ref_log_probs=True)
    assert trainer.ref_model is None
    trainer.train()
    table = trainer._ref_table
    assert (tmp_path / REF_LOG_PROBS_FILE).is_file()
    batch = PreferenceCollator(tokenizer.pad_token_id)(data.items)
    with torch.no_grad():
        expected, _ = pair_log_probs(start, batch)
    torch.testing.assert_close(table, torch.stack([expected[:8], expected[8:]], dim=1), rtol=1e-5, atol=1e-5)
    # a second trainer in the same folder (a resume) reads the table instead of computing it
    again = _trainer(tmp_path, _fresh(tokenizer), tokenizer, data, precompute_ref_log_probs=True, max_steps=1)
    again._compute_table = lambda: pytest.fail("the stored reference log-probs were computed again")
    again.train()
    assert torch.equal(again._ref_table, table)
    assert "reference log-probs read from" in capsys.readouterr().out


# -- gradient accumulation ---------------------------------------------------------------------------------------

def test_gradient_accumulation_gives_the_update_of_one_large_batch(pairs, model_parts, tmp_path):
    samples, folder = pairs
    _, tokenizer, processor = model_parts
    data = PairList(_more_pairs(samples), folder, tokenizer, processor, _fresh(tokenizer).vlm_config.num_image_tokens)
    finals = {}
    for name, flags in {"b4": dict(per_device_train_batch_size=4),
                        "b2x2": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
                        "b2": dict(per_device_train_batch_size=2, max_steps=4)}.items():
        model = _fresh(tokenizer)
        _trainer(tmp_path / name, model, tokenizer, data, **{"max_steps": 2, **flags}).train()
        finals[name] = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in finals["b4"].items():
        torch.testing.assert_close(finals["b2x2"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # sensitive: the same 8 pairs in 4 unaccumulated updates end elsewhere
    assert any(not torch.allclose(finals["b2"][k], v, rtol=1e-5, atol=1e-6) for k, v in finals["b4"].items())


# -- a run through vlm.train.run.run ------------------------------------------------------------------------------

def dpo_workspace(root: Path) -> dict:
    """The synthetic shapes set's preference pairs (LLaVA-style: chosen = the truth, rejected = a wrong answer of
    the same kind) and tiny LLM / vision folders; also used by tests/test_dpo_distributed.py."""
    import json

    from vlm.data.synth import generate_shapes_dataset, write_preference_pairs
    from vlm.tiny import save_tiny_components

    data = generate_shapes_dataset(root / "data", n_train=16, n_eval=2, image_size=32, seed=0)
    pairs = write_preference_pairs(root / "data", splits=("train",))["train"]
    records = json.loads(Path(pairs).read_text())
    texts = [t["value"] for r in records for t in r["conversations"]] + [r[k] for r in records
                                                                         for k in ("chosen", "rejected")]
    llm, vision = save_tiny_components(root / "models", texts)
    return {"llm": llm, "vision": vision, "data": pairs, "images": data["image_folder"]}


def dpo_flags(ws: dict, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", ws["llm"], "--vision_tower", ws["vision"], "--data_path", ws["data"],
            "--image_folder", ws["images"], "--output_dir", str(out), "--report_to", "none", "--use_cpu", "True",
            "--dataloader_num_workers", "0", "--seed", "0", "--logging_steps", "1", "--method", "dpo", *extra]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return dpo_workspace(tmp_path_factory.mktemp("dpo_run"))


def test_dpo_run_learns_resumes_and_saves_a_model_that_loads(workspace, tmp_path, capsys):
    import json
    import shutil

    import vlm
    from safetensors.torch import load_file

    from vlm.train.config import RunConfig
    from vlm.train.dpo import METRIC_NAMES, REF_LOG_PROBS_FILE
    from vlm.train.run import run

    flags = ("--max_steps", "16", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--beta", "0.5",
             "--precompute_ref_log_probs", "True", "--save_strategy", "steps", "--save_steps", "8")
    result = run(RunConfig.from_flags(dpo_flags(workspace, tmp_path / "full", *flags)))
    out = tmp_path / "full"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert all(name in row for row in rows for name in (*METRIC_NAMES, "loss"))
    loss = [r["loss"] for r in rows]
    accuracy = [r["rewards/accuracies"] for r in rows]
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.08, loss  # measured 0.74 -> 0.54
    assert sum(accuracy[-4:]) / 4 > sum(accuracy[:4]) / 4 + 0.15, accuracy  # measured 0.40 -> 0.68
    record = json.loads((out / "vlm_run.json").read_text())
    assert record["method"] == "dpo" and record["beta"] == 0.5 and record["precompute_ref_log_probs"] is True

    # the saved folder loads, with the trained weights
    model, _ = vlm.load(out)
    trained = result.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key

    # killed after the first checkpoint: the same command resumes there, reuses the stored reference log-probs and
    # ends with the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-8", resumed / "checkpoint-8")
    for name in ("vlm_run.json", REF_LOG_PROBS_FILE):
        shutil.copy(out / name, resumed / name)
    capsys.readouterr()
    again = run(RunConfig.from_flags(dpo_flags(workspace, resumed, *flags)))
    assert again.resumed_from.endswith("checkpoint-8")
    assert "reference log-probs read from" in capsys.readouterr().out
    a, b = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # other DPO settings in that folder are refused, naming the flag
    from vlm.errors import UserError

    with pytest.raises(UserError, match="--beta"):
        run(RunConfig.from_flags(dpo_flags(workspace, resumed, *("0.1" if f == "0.5" else f for f in flags))))


def test_dpo_flags_parse_and_are_checked(tmp_path):
    """TRL's flag names parse into the run config; a DPO flag without --method dpo, or a combination that would
    silently do something else, is one ConfigError naming the flag."""
    from vlm.errors import ConfigError
    from vlm.train.arguments import parse_args

    base = ["--output_dir", str(tmp_path), "--use_cpu", "True"]
    _, _, args = parse_args([*base, "--method", "dpo", "--beta", "0.3", "--loss_type", "robust", "--label_smoothing",
                             "0.1", "--rpo_alpha", "0.5", "--precompute_ref_log_probs"])
    assert DPOSettings.from_args(args) == DPOSettings(beta=0.3, loss_type="robust", label_smoothing=0.1,
                                                      rpo_alpha=0.5, precompute_ref_log_probs=True)
    assert parse_args(base)[2].method == "sft"
    assert parse_args([*base, "--method", "dpo", "--packing"])[2].packing  # packed pairs: tests/test_dpo_packing.py
    for flags, named in [(["--beta", "0.2"], "--beta"), (["--method", "dpo", "--loss_type", "hinge"], "hinge"),
                         (["--method", "dpo", "--loss_type", "ipo", "--label_smoothing", "0.1"], "--label_smoothing"),
                         (["--method", "ppo"], "ppo")]:
        with pytest.raises(ConfigError, match=named):
            parse_args([*base, *flags])


def test_dpo_on_plain_conversations_is_one_line(workspace, tmp_path):
    """Supervised data given to --method dpo is refused before training, naming a sample and the way out."""
    from vlm.errors import ConfigError
    from vlm.train.config import RunConfig
    from vlm.train.run import run

    sft_data = str(Path(workspace["data"]).with_name("train.json"))  # the same pictures' supervised conversations
    flags = [f if f != workspace["data"] else sft_data
             for f in dpo_flags(workspace, tmp_path / "out", "--max_steps", "1")]
    with pytest.raises(ConfigError, match="plain conversation .*--method sft") as caught:
        run(RunConfig.from_flags(flags))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()
