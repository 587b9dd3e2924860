"""`VLMTrainer`: `transformers.Trainer` with what a VLM run needs and nothing else.

Kept from `Trainer`: the loop, gradient accumulation with the loss normalised over the whole window
(`num_items_in_batch`, honoured by our model's forward), DDP/DeepSpeed/FSDP through accelerate,
schedulers, logging integrations, resume (optimizer, scheduler, RNG, data position).
Changed here:
- optimizer parameter groups: projector and vision tower on their own learning rates, no weight
  decay on biases, norms and other 1-D parameters;
- the modality/length-grouped sampler (LLaVA-1.5's `group_by_modality_length`);
- saving: our model folder (or LoRA run), with tokenizer and image processor, built from the state dict
  the Trainer hands over (under DeepSpeed ZeRO-3 the live parameters are empty shards); checkpoints
  written through `vlm.train.checkpointing.staged_folder` (a staging folder renamed when complete), so a
  killed run never leaves a half checkpoint that a resume or `save_total_limit` could pick up;
- DeepSpeed ZeRO-3 and FSDP: the model runs its vision path on text-only batches too
  (`vision_on_text_only`), as every rank must gather the same sharded parameters;
- loading a checkpoint for resume with our strict loaders (which checkpoint, and whether the run is
  already finished: `vlm.train.run_folder`), and the best checkpoint for `--load_best_model_at_end`;
- evaluation (`vlm.train.evaluation`): `eval_loss` with the supervised-only loss (no (B, T, V) logits), plus
  the optional generation metric `eval_<metric>` in the same logged row.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from safetensors.torch import save_file

from vlm.folders.lora import load_lora_checkpoint
from vlm.folders.weights import load_state_dict, load_state_dict_strict, save_model_folder
from vlm.quantization import eval_mode
from vlm.train.checkpointing import staged_folder
from vlm.data.dataset import DATA_DROPS_KEY
from vlm.train.data_drops import record_drops
from vlm.train.dataset import groups_by_modality

PROJECTOR_FILE = "mm_projector.safetensors"


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "bias" in name or "norm" in name.lower()


def component_of(name: str) -> str:
    """'projector', 'vision' or 'llm' from a parameter name (PEFT prefixes included)."""
    if "mm_projector." in name:
        return "projector"
    if "vision_tower." in name:
        return "vision"
    return "llm"


def build_param_groups(model: torch.nn.Module, *, lr: float, weight_decay: float,
                       projector_lr: float | None = None, vision_lr: float | None = None) -> list[dict]:
    """Optimizer groups by (component, decay); empty groups are left out."""
    rates = {"llm": lr, "projector": projector_lr or lr, "vision": vision_lr or lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component, no_decay = component_of(name), is_no_decay(name, param)
        group = groups.setdefault((component, no_decay), {
            "params": [], "lr": rates[component], "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{component}{'_no_decay' if no_decay else ''}"})
        group["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters: check the stage flags (--tune_mm_mlp_adapter, --freeze_*)")
    return list(groups.values())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The VLM under DDP/PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` less the second name of each tied parameter (`lm_head.weight` tied to the embeddings).

    A state dict the Trainer hands over under DeepSpeed holds copies, so tied weights no longer share storage
    and the folder would store them twice; the live model still knows which names are one parameter.
    """
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    tied = {name for name, tensor in model.state_dict(keep_vars=True).items() if first[id(tensor)] != name}
    return {k: v for k, v in state_dict.items() if k not in tied}


def projector_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """`mm_projector.*` tensors (what `--pretrain_mm_mlp_adapter` loads) from `state_dict` (any wrapper's key
    prefix) or, when None, from the live model."""
    if state_dict is None:
        state_dict = {f"mm_projector.{k}": v for k, v in unwrap(model).mm_projector.state_dict().items()}
    return {key[key.index("mm_projector."):]: v.detach().contiguous().cpu()
            for key, v in state_dict.items() if "mm_projector." in key}


class TokenRate:
    """Tokens per second over the steps between two logs, for all processes (this one's count x world size)."""

    def __init__(self):
        self.tokens = 0
        self.since: float | None = None  # when counting started: the first step after the previous log

    def count(self, tokens: int) -> None:
        if self.since is None:
            self.since = time.perf_counter()
        self.tokens += tokens

    def take(self, world_size: int) -> float | None:
        """The rate since the previous `take` (None before any step), and start counting afresh."""
        now = time.perf_counter()
        rate = None
        if self.since is not None and now > self.since:
            rate = round(self.tokens * world_size / (now - self.since), 1)
        self.since, self.tokens = now, 0
        return rate


def init_deepspeed_comm(training_args) -> None:
    """Start DeepSpeed's communication before the model is built (a no-op without `--deepspeed`).

    ZeRO-3 shards parameters as `from_pretrained` creates them (`deepspeed.zero.Init`), which needs the world
    size. accelerate starts DeepSpeed's communication itself on GPUs, not with `--use_cpu` (DeepSpeed's CPU
    accelerator): `zero.Init` then takes one process for the whole run and fails its batch-size check.
    """
    if not training_args.deepspeed:
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else None)


class VLMTrainer(Trainer):
    def __init__(self, *args, image_processor=None, template: str | None = None, lora: bool = False,
                 save_projector: bool = False, generation_eval=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval  # vlm.train.evaluation.GenerationEval, or None
        self.image_processor = image_processor
        self.template = template
        self.lora = lora
        self.save_projector = save_projector
        self.token_rate = TokenRate()
        # ZeRO-3 (and FSDP) shard parameters: a rank without images must still run (and gather) the vision path.
        unwrap(self.model).vision_on_text_only = is_deepspeed_zero3_enabled() or self.is_fsdp_enabled

    # -- optimizer ------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = build_param_groups(opt_model, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                        projector_lr=getattr(self.args, "mm_projector_lr", None),
                                        vision_lr=getattr(self.args, "mm_vision_tower_lr", None))
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)  # each group carries its own
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # -- sampling -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if groups_by_modality(getattr(self.args, "group_by_modality_length", False), dataset):
            from vlm.data.sampler import ModalityLengthGroupedSampler

            return ModalityLengthGroupedSampler(
                list(dataset.lengths), list(dataset.has_image),
                batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
                world_size=self.args.world_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # -- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Our model folder or LoRA run, from `state_dict` when the Trainer hands one over (DeepSpeed, FSDP:
        the consolidated weights; on the processes that do not save it may be empty). Runs on every process."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = self._with_frozen_lora_tensors(state_dict)  # a collective: before the non-saving ranks leave
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        tokenizer = self.processing_class
        if self.template is not None:  # what test.py / chat prompt the model with: config.json's `template`
            vlm_model = unwrap(self.model)
            vlm_model.vlm_config = vlm_model.vlm_config.replace(template=self.template)
        if self.lora:
            from vlm.folders.lora import save_lora_run

            save_lora_run(self.accelerator.unwrap_model(self.model), output_dir, tokenizer=tokenizer,
                          image_processor=self.image_processor, cache_dir=self.args.cache_dir, state_dict=state_dict)
        else:
            vlm_model = unwrap(self.model)
            if state_dict is not None:
                state_dict = without_tied_copies(vlm_model, state_dict)
            save_model_folder(output_dir, vlm_model, tokenizer=tokenizer,
                              image_processor=self.image_processor, state_dict=state_dict)
        if self.save_projector:  # stage 1: what --pretrain_mm_mlp_adapter loads
            save_file(projector_state(self.model, state_dict), os.path.join(output_dir, PROJECTOR_FILE),
                      metadata={"format": "pt"})

    def _with_frozen_lora_tensors(self, state_dict: dict | None) -> dict | None:
        """Under ZeRO-3 the Trainer hands a PEFT model only its trainable tensors (`exclude_frozen_parameters`),
        but a LoRA run also saves frozen ones: a frozen vision tower and projector, resized embeddings. Those are
        gathered here from their shards, on every process (a collective), kept by the saving one."""
        if not (self.lora and is_deepspeed_zero3_enabled()):  # (the dict is None on the processes that do not save)
            return state_dict
        import deepspeed

        peft_model = self.accelerator.unwrap_model(self.model)
        vlm_model = peft_model.get_base_model()
        modules = [vlm_model.vision_tower, vlm_model.mm_projector, vlm_model.get_input_embeddings(),
                   vlm_model.get_output_embeddings()]
        wanted = {id(p) for m in modules if m is not None for p in m.parameters()}
        # what `exclude_frozen_parameters` left out; decided from the model alone, the same on every process
        missing = [(name, p) for name, p in peft_model.named_parameters() if id(p) in wanted and not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in missing]):
            if self.args.should_save:
                state_dict = {**state_dict, **{name: p.detach().clone().cpu() for name, p in missing}}
        return state_dict

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint (model, optimizer, scheduler, scaler, RNG, trainer state), written by every
        process into a staging folder that `staged_folder` renames to `<output_dir>/checkpoint-N` once complete.

        The same steps as `Trainer._save_checkpoint`, except that the best checkpoint is looked up and the Hub
        push made after the rename, so both see the final folder.
        """
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        best = self._best_checkpoint(run_dir)
        if best is not None:  # before the state is written, so the checkpoint records it as transformers' does
            self.state.best_model_checkpoint = best
        with staged_folder(final, is_writer=self.args.should_save) as folder:
            self.save_model(folder, _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(folder)
                self._save_scaler(folder)
                self._save_rng_state(folder)
            if self.args.should_save:
                self._export_callback_states()
                self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

    def _best_checkpoint(self, run_dir: str) -> str | None:
        """The checkpoint of the best evaluation so far (`state.best_global_step`, set by the Trainer's
        `_determine_best_metric`): the one being written now, or an earlier one still on disk; None when none."""
        step = self.state.best_global_step
        if not step:
            return None
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        return best if step == self.state.global_step or os.path.isdir(best) else None

    def _load_best_model(self) -> None:
        """`--load_best_model_at_end`: the best checkpoint's weights through our strict loaders (a vlm model folder
        or LoRA run, not the files transformers' own loader looks for); DeepSpeed and FSDP load their engine's
        checkpoint as transformers does."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        if self.args.should_save:
            print(f"loading the best model: {self.state.best_model_checkpoint} ({self.args.metric_for_best_model} "
                  f"{self.state.best_metric})", flush=True)
        self._load_checkpoint_weights(self.state.best_model_checkpoint, self.model)

    def _export_callback_states(self) -> None:
        """Stateful callbacks (early stopping, ...) and the control flags into `self.state`, as the Trainer does."""
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if is_deepspeed_zero3_enabled() and self.deepspeed is None:
            # No DeepSpeed engine to consolidate the shards (a finished run's model written without training,
            # vlm.train.run): the parameters, sharded since the model was built, are gathered here.
            self._save(output_dir, state_dict=self._gathered_state_dict())
            return
        super().save_model(output_dir, _internal_call)

    def _gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """ZeRO-3 without an engine: the full state dict of the (PEFT) model on process 0, None elsewhere; a
        collective, every process calls it."""
        import deepspeed

        model = self.accelerator.unwrap_model(self.model)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            if self.args.process_index != 0:
                return None
            copies: dict[int, torch.Tensor] = {}  # tied weights stay one tensor, saved once
            return {k: copies.setdefault(v.data_ptr(), v.detach().clone().cpu()) for k, v in model.state_dict().items()}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if is_deepspeed_zero3_enabled():
            # Called only without an engine (the Trainer resumes an engine with deepspeed_load_checkpoint): the
            # sharded parameters are gathered, process 0 loads them, and its values are sharded again on exit.
            import deepspeed

            params = list(self.accelerator.unwrap_model(model).parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if self.args.process_index == 0:
                    self._load_checkpoint_weights(resume_from_checkpoint, model)
            return
        self._load_checkpoint_weights(resume_from_checkpoint, model)

    def _load_checkpoint_weights(self, resume_from_checkpoint: str, model) -> None:
        if self.lora:
            load_lora_checkpoint(self.accelerator.unwrap_model(model), resume_from_checkpoint,
                                 cache_dir=self.args.cache_dir)
        else:
            load_state_dict_strict(unwrap(model), load_state_dict(resume_from_checkpoint),
                                   source=f"checkpoint {resume_from_checkpoint!r}")

    # -- evaluation ------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(DATA_DROPS_KEY, None)  # an eval sample whose image went bad: its stand-in is already in the batch
        if prediction_loss_only and getattr(self.args, "supervised_only_loss", False):
            inputs = {**inputs, "skip_logits": True}  # the loss alone: vlm.llm.mixin skips the (B, T, V) logits
        with eval_mode(model):  # 4-bit layers stay trainable (vlm.quantization.eval_mode)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """transformers' loop (`eval_loss`), then `eval_<metric>` of the generation subset in the same metrics."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.generation_eval is not None:
            scores = self.generation_eval(unwrap(self.model), self.processing_class, self.image_processor,
                                          process_index=self.args.process_index)
            output.metrics.update({f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in scores.items()})
        return output

    # -- throughput -----------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        record_drops(self, inputs)  # samples the dataset replaced: counted, and off the batch before the forward
        mask = inputs.get("attention_mask")
        self.token_rate.count(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            rate = self.token_rate.take(self.args.world_size)
            if rate is not None:
                logs["tokens_per_s"] = rate
        super().log(logs, start_time)
