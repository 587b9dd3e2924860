"""`VLMTrainer`: `transformers.Trainer` with what a VLM run needs and nothing else.

Kept from `Trainer`: the loop, gradient accumulation with the loss normalised over the whole window
(`num_items_in_batch`, honoured by our model's forward), DDP/DeepSpeed/FSDP through accelerate,
schedulers, logging integrations, resume (optimizer, scheduler, RNG, data position).
Changed here:
- optimizer parameter groups: projector and vision tower on their own learning rates, no weight
  decay on biases, norms and other 1-D parameters;
- the modality/length-grouped sampler (LLaVA-1.5's `group_by_modality_length`);
- saving: our model folder (or LoRA run), with tokenizer and image processor, and checkpoints written
  to a staging folder and renamed when complete, so a killed run never leaves a half checkpoint that
  a resume or `save_total_limit` could pick up;
- loading a checkpoint for resume with our strict loaders (which checkpoint, and whether the run is
  already finished: `vlm.train.run_folder`).
"""

from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from safetensors.torch import save_file

from vlm.folders.lora import load_lora_checkpoint
from vlm.folders.weights import load_state_dict, load_state_dict_strict, save_model_folder
from vlm.train.data_drops import record_drops

STAGING_DIR = ".incomplete"
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


class VLMTrainer(Trainer):
    def __init__(self, *args, image_processor=None, template: str | None = None, lora: bool = False,
                 save_projector: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_processor = image_processor
        self.template = template
        self.lora = lora
        self.save_projector = save_projector
        self._staging = False

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
        if getattr(self.args, "group_by_modality_length", False):
            from vlm.data.sampler import ModalityLengthGroupedSampler

            return ModalityLengthGroupedSampler(
                list(dataset.lengths), list(dataset.has_image),
                batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
                world_size=self.args.world_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # -- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
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
                          image_processor=self.image_processor, cache_dir=self.args.cache_dir)
        else:
            save_model_folder(output_dir, unwrap(self.model), tokenizer=tokenizer,
                              image_processor=self.image_processor, state_dict=state_dict)
        if self.save_projector:  # stage 1: what --pretrain_mm_mlp_adapter loads
            projector = unwrap(self.model).mm_projector.state_dict()
            save_file({f"mm_projector.{k}": v.detach().contiguous() for k, v in projector.items()},
                      os.path.join(output_dir, PROJECTOR_FILE), metadata={"format": "pt"})

    def _get_output_dir(self, trial) -> str:
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING_DIR) if self._staging else out

    def _save_checkpoint(self, model, trial) -> None:
        """Write into `<output_dir>/.incomplete/checkpoint-N`, then rename it into place."""
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(run_dir, STAGING_DIR, name), final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        if distributed:
            dist.barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if self.lora:
            load_lora_checkpoint(self.accelerator.unwrap_model(model), resume_from_checkpoint,
                                 cache_dir=self.args.cache_dir)
        else:
            load_state_dict_strict(unwrap(model), load_state_dict(resume_from_checkpoint),
                                   source=f"checkpoint {resume_from_checkpoint!r}")

    # -- throughput -----------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        record_drops(self, inputs)  # samples the dataset replaced: counted, and off the batch before the forward
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        if getattr(self, "_last_log_time", None) is None:
            self._last_log_time = time.perf_counter()
        self._tokens_since_log = getattr(self, "_tokens_since_log", 0) + tokens
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            last = getattr(self, "_last_log_time", None)
            tokens = getattr(self, "_tokens_since_log", 0) * self.args.world_size
            if last is not None and now > last:
                logs["tokens_per_s"] = round(tokens / (now - last), 1)
            self._last_log_time, self._tokens_since_log = now, 0
        super().log(logs, start_time)
