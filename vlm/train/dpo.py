"""Direct preference optimisation (DPO): the losses, and `DPOTrainer`, the `VLMTrainer` that trains on pairs.

The losses follow TRL (trl/trainer/dpo_trainer.py, `DPOTrainer._compute_loss`, trl 1.16) with TRL's names and
meanings; tests/test_dpo.py calls TRL's own code on the same log-probabilities and compares loss and gradient.
With Δ = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected)), per pair:
- `sigmoid` (DPO): −log σ(βΔ); with `label_smoothing` ε > 0 the conservative cDPO form
  −(1−ε) log σ(βΔ) − ε log σ(−βΔ) (TRL ≤ 0.x's sigmoid; TRL 1.16 keeps this form in its `aot` losses and dropped
  it from `sigmoid`);
- `robust` (rDPO, TRL's `robust`): (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε);
- `ipo`: (Δc/nc − Δr/nr − 1/(2β))², each log-ratio divided by its answer's token count as TRL does (its comment:
  the normalisation the IPO authors confirmed);
- `rpo_alpha` α adds α × the mean negative log-likelihood of the chosen answers' tokens (RPO; TRL 1.16's
  `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, α]`).
Reference-free objectives (`reference_free_losses`; no reference model is built or run), on the mean log-probability
per token p̄ of each answer: `orpo` (Hong et al. 2024; TRL's ORPOTrainer) −β log σ(log odds(p̄c) − log odds(p̄r)) plus
the chosen answers' NLL; `simpo` (Meng et al. 2024; TRL's CPOTrainer loss_type="simpo") −log σ(β(p̄c − p̄r) − γ),
γ = `--simpo_gamma`. tests/test_preference_losses.py compares both with TRL's code and the papers' formulas.
The batch loss is the mean over pairs (+ the NLL term). Rewards: β × each side's log-ratio, logged with TRL's names
(`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`).

The trainer:
- one forward of 2B rows per batch (the collator's chosen rows, then rejected: vlm.data.preference), each
  image encoded once (`image_index`), the log-probabilities of the answer tokens only (`answer_labels`: the
  LM head runs on the answer positions, no (2B, T, V) logits; vlm.llm.loss.answer_log_probs); with `--packing`
  the 2B sides packed into rows, each answer scored on its own segment (vlm.data.preference.PreferenceCollator);
- the reference: with LoRA the same model with its adapters disabled (peft's `disable_adapter()`), and the
  other parameters that train (the projector, a trainable vision tower, LoRA-trained biases) at their start
  values, swapped in for the reference forward from a copy of those parameters only, never of the LLM (adapters
  that start trained, from `--lora_weight_path`, are part of the start model: their start values are swapped in
  too, instead of disabling them, as TRL keeps a "ref" copy of such an adapter), in eval mode (no dropout) for
  that forward; without LoRA a frozen copy of the
  start model (eval mode, no gradients); with `--precompute_ref_log_probs` neither: the reference log-probs of
  every pair are computed once before training, by process 0, from the start model, and stored in the output
  folder (`REF_LOG_PROBS_FILE`), which a resume reads back;
- gradient accumulation: each micro-batch's mean divided by the accumulation steps (`loss_is_scaled_for_ga`
  False), so equal micro-batches give the update of one large batch; under DDP the gradients' average over
  processes does the same.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vlm.data.preference import ANSWER_SEQUENCE_KEY, IMAGE_INDEX_KEY, PAIR_INDEX_KEY
from vlm.quantization import eval_mode
from vlm.train.trainer import VLMTrainer, unwrap

LOSS_TYPES = ("sigmoid", "ipo", "robust", "orpo", "simpo")
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "simpo")  # the ones `label_smoothing` applies to
REFERENCE_FREE_LOSS_TYPES = ("orpo", "simpo")  # no reference model: none is built, none is run
REF_LOG_PROBS_FILE = "ref_log_probs.safetensors"


@dataclass(frozen=True)
class DPOSettings:
    """The DPO flags (TRL's names): `--beta --loss_type --label_smoothing --rpo_alpha --precompute_ref_log_probs`."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    precompute_ref_log_probs: bool = False
    simpo_gamma: float = 0.5

    @classmethod
    def from_args(cls, args) -> "DPOSettings":
        return cls(beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                   rpo_alpha=args.rpo_alpha, precompute_ref_log_probs=args.precompute_ref_log_probs,
                   simpo_gamma=args.simpo_gamma)

    @property
    def reference_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE_LOSS_TYPES


def dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, chosen_num_tokens: torch.Tensor | None = None,
               rejected_num_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (module docstring) from (B,) summed answer log-probabilities.

    Args:
        chosen_logps, rejected_logps: (B,) the policy's log-probabilities of each answer.
        ref_chosen_logps, ref_rejected_logps: (B,) the reference's.
        beta: β; label_smoothing: ε (sigmoid: cDPO, robust: rDPO).
        chosen_num_tokens, rejected_num_tokens: (B,) answer token counts (`ipo` divides by them).
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are detached.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    delta = chosen_logratios - rejected_logratios  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_num_tokens is None or rejected_num_tokens is None:
            raise ValueError("loss_type='ipo' needs chosen_num_tokens and rejected_num_tokens")
        ipo_delta = (chosen_logratios / chosen_num_tokens.clamp(min=1)
                     - rejected_logratios / rejected_num_tokens.clamp(min=1))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reference_free_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float, loss_type: str,
                          chosen_num_tokens: torch.Tensor, rejected_num_tokens: torch.Tensor,
                          label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of the objectives without a reference model, from (B,) summed answer log-probabilities; both
    score an answer by its mean log-probability per token, p̄ = logps / num_tokens, as the papers and TRL do.

    - `orpo` (Hong et al. 2024, ORPO, eq. 4-7; TRL's `ORPOTrainer.odds_ratio_loss`): the log odds ratio
      r = (p̄c − p̄r) − (log(1 − e^p̄c) − log(1 − e^p̄r)), loss −β log σ(r) (β is the paper's λ); the paper's
      NLL on the chosen answer is added by `dpo_loss` with weight 1.
    - `simpo` (Meng et al. 2024, SimPO, eq. 6; TRL's `CPOTrainer` with `loss_type="simpo"`): −log σ(β(p̄c − p̄r) − γ)
      with γ = `simpo_gamma`, and TRL's label smoothing −(1−ε) log σ(x) − ε log σ(−x).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): rewards β p̄, detached, as TRL logs them.
    """
    chosen = chosen_logps.float() / chosen_num_tokens.clamp(min=1)  # (B,) mean log-probability per token
    rejected = rejected_logps.float() / rejected_num_tokens.clamp(min=1)  # (B,)
    if loss_type == "orpo":
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
        losses = -beta * F.logsigmoid(log_odds)
    elif loss_type == "simpo":
        logits = beta * (chosen - rejected) - simpo_gamma
        losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    else:
        raise ValueError(f"loss_type {loss_type!r}; expected one of {REFERENCE_FREE_LOSS_TYPES}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation: two forms, split at −log 2 (Mächler 2012; TRL's log1mexp)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def chosen_nll(chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """The mean negative log-likelihood per token of the chosen answers (RPO's term): −Σ log p / Σ tokens."""
    return -chosen_logps.sum() / chosen_num_tokens.sum().clamp(min=1)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, settings: DPOSettings, *,
             chosen_num_tokens: torch.Tensor, rejected_num_tokens: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch loss under `settings`: mean of `dpo_losses`, plus `rpo_alpha` × `chosen_nll` when set;
    returns (loss, chosen_rewards (B,), rejected_rewards (B,)). Reference-free losses (orpo, simpo) ignore the
    reference log-probs (None); ORPO's loss always includes the chosen answers' NLL (weight 1)."""
    if settings.reference_free:
        losses, chosen_rewards, rejected_rewards = reference_free_losses(
            chosen_logps, rejected_logps, beta=settings.beta, loss_type=settings.loss_type,
            chosen_num_tokens=chosen_num_tokens, rejected_num_tokens=rejected_num_tokens,
            label_smoothing=settings.label_smoothing, simpo_gamma=settings.simpo_gamma)
    else:
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=settings.beta,
            loss_type=settings.loss_type, label_smoothing=settings.label_smoothing,
            chosen_num_tokens=chosen_num_tokens, rejected_num_tokens=rejected_num_tokens)
    loss = losses.mean()
    if settings.loss_type == "orpo":
        loss = loss + chosen_nll(chosen_logps, chosen_num_tokens)
    if settings.rpo_alpha:
        loss = loss + settings.rpo_alpha * chosen_nll(chosen_logps, chosen_num_tokens)
    return loss, chosen_rewards, rejected_rewards


def pair_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a pair batch (vlm.data.preference.PreferenceCollator, padded or packed): (2B,) answer
    log-probabilities and (2B,) answer token counts, chosen sides first. Each image is encoded once for both sides."""
    if ANSWER_SEQUENCE_KEY in batch:  # packed rows: per-sequence sums, images by index
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    pixel_values=batch.get("pixel_values"), image_index=batch.get(IMAGE_INDEX_KEY),
                    answer_labels=batch["labels"], answer_sequence_index=batch[ANSWER_SEQUENCE_KEY])
    else:  # padded: chosen rows, then rejected rows in the same order, so the images twice over
        pixels = batch.get("pixel_values")
        twice = None if pixels is None else torch.arange(pixels.shape[0]).repeat(2)  # (2N,)
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    pixel_values=pixels, answer_labels=batch["labels"], image_index=twice)
    return out.logps, out.num_tokens


class DPOTrainer(VLMTrainer):
    """`VLMTrainer` whose loss is DPO's on pair batches (module docstring); `dpo`: the `DPOSettings`."""

    loss_is_scaled_for_ga = False  # a per-pair mean: transformers divides it by the accumulation steps

    def __init__(self, *args, dpo: DPOSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self.ref_model = None
        self._ref_start_values: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._ref_table: torch.Tensor | None = None  # (N, 2) precomputed reference log-probs
        self._sums: dict[str, float] = defaultdict(float)
        self._pairs = 0
        self._disable_adapters = False
        if dpo.reference_free:
            pass  # orpo, simpo: no reference model, no start values
        elif self.lora:
            # New adapters (lora_B = 0) change nothing at the start: with them off the LLM is the start model's, and
            # only the other trainable parts need their start values. Adapters that start trained
            # (--lora_weight_path) are part of the start model: their start values are kept too, and stay on.
            peft_model = self.accelerator.unwrap_model(self.model)
            self._disable_adapters = all(not p.any() for n, p in peft_model.named_parameters() if "lora_B" in n)
            self._ref_start_values = {p: p.detach().clone() for name, p in peft_model.named_parameters()
                                      if p.requires_grad and not (self._disable_adapters and "lora_" in name)}
        elif not dpo.precompute_ref_log_probs:
            self.ref_model = frozen_copy(unwrap(self.model)).to(self.args.device)

    # -- the reference --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _start_values(self):
        """The non-adapter parameters of a LoRA run at their start values, for a forward under no_grad."""
        current = {p: p.data for p in self._ref_start_values}
        try:
            for p, start in self._ref_start_values.items():
                p.data = start
            yield
        finally:
            for p, data in current.items():
                p.data = data

    @torch.no_grad()
    def reference_log_probs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) the reference's answer log-probabilities and counts for a pair batch, computed (not looked up)."""
        if self.ref_model is not None:
            return pair_log_probs(self.ref_model, batch)
        if self.lora:
            peft_model = self.accelerator.unwrap_model(self.model)
            adapters_off = peft_model.disable_adapter() if self._disable_adapters else contextlib.nullcontext()
            with adapters_off, self._start_values(), eval_mode(peft_model):
                return pair_log_probs(peft_model, batch)
        with eval_mode(unwrap(self.model)):  # precomputing, before any step: the start model itself
            return pair_log_probs(unwrap(self.model), batch)

    def _reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch[PAIR_INDEX_KEY].numel()
        if self._ref_table is not None:
            table = self._ref_table[batch[PAIR_INDEX_KEY].cpu()].to(batch["input_ids"].device)  # (B, 2)
            return table[:, 0], table[:, 1]
        logps, _ = self.reference_log_probs(batch)
        return logps[:b], logps[b:]

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        b = inputs[PAIR_INDEX_KEY].numel()
        ref_chosen, ref_rejected = (None, None) if self.dpo.reference_free else self._reference(inputs)
        logps, num_tokens = pair_log_probs(model, inputs)  # (2B,), (2B,)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:b], logps[b:], ref_chosen, ref_rejected, self.dpo,
            chosen_num_tokens=num_tokens[:b], rejected_num_tokens=num_tokens[b:])
        if model.training:
            self._record(chosen_rewards, rejected_rewards, logps[:b].detach(), logps[b:].detach())
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def _record(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
        """Sums over the pairs of every process since the last log (a collective: every process calls it)."""
        values = torch.stack([chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                              chosen_rewards - rejected_rewards, chosen_logps, rejected_logps], dim=1)  # (B, 6)
        values = self.accelerator.gather(values.float())  # (world * B, 6)
        for name, total in zip(METRIC_NAMES, values.sum(dim=0).tolist()):
            self._sums[name] += total
        self._pairs += values.shape[0]

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._pairs:
            logs.update({name: round(total / self._pairs, 6) for name, total in self._sums.items()})
            self._sums.clear()
            self._pairs = 0
        super().log(logs, start_time)

    # -- precomputed reference log-probs ----------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.dpo.precompute_ref_log_probs and self._ref_table is None:
            self._ref_table = self._precomputed_table()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _precomputed_table(self) -> torch.Tensor:
        """(N, 2) reference log-probs of every pair (chosen, rejected): read from the output folder when it holds
        this data's (a resume), else computed by process 0 from the start model and written there."""
        path = os.path.join(self.args.output_dir, REF_LOG_PROBS_FILE)
        key = dataset_key(self.train_dataset)
        if self.args.process_index == 0:
            table = read_ref_table(path, key)
            if table is None:
                table = self._compute_table()
                write_ref_table(path, table, key)
                print(f"dpo: reference log-probs of {table.shape[0]} pairs computed and stored in {path}", flush=True)
            else:
                print(f"dpo: reference log-probs read from {path}", flush=True)
        _barrier()
        if self.args.process_index != 0:
            table = read_ref_table(path, key)
            if table is None:
                raise RuntimeError(f"{path} is missing after process 0 wrote it: is --output_dir shared by all nodes?")
        return table

    def _compute_table(self) -> torch.Tensor:
        from torch.utils.data import DataLoader

        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=False,
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        table = torch.zeros(len(self.train_dataset), 2)
        unwrap(self.model).to(self.args.device)
        for batch in loader:
            batch.pop("data_drops", None)  # replaced samples: scored as the stand-in they were replaced by
            batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logps, _ = self.reference_log_probs(batch)
            b = batch[PAIR_INDEX_KEY].numel()
            table[batch[PAIR_INDEX_KEY].cpu()] = torch.stack([logps[:b], logps[b:]], dim=1).float().cpu()
        return table


METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` for the reference: eval mode, no parameter requires grad."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def dataset_key(dataset) -> str:
    """What identifies the pairs a table belongs to: their record positions in the mix (the data files are part of
    the run record, which a resume must match)."""
    positions = getattr(dataset, "_positions", range(len(dataset)))
    return hashlib.sha256(json.dumps(list(positions)).encode()).hexdigest()[:16]


def read_ref_table(path: str, key: str) -> torch.Tensor | None:
    """The stored (N, 2) table when `path` holds one for `key`, else None."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("pairs_key") != key:
                return None
            return f.get_tensor("ref_logps")
    except Exception:  # damaged: computed again
        return None


def write_ref_table(path: str, table: torch.Tensor, key: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({"ref_logps": table.contiguous()}, tmp, metadata={"pairs_key": key, "columns": "chosen,rejected"})
    os.replace(tmp, path)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
