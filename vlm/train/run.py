"""`run(config)`: one training run, from a `RunConfig` to a saved model folder.

The command line (`vlm.cli.train`, `python train.py`), the demo (`vlm.demo`) and the tests all train
through `run`; `fit` is its second half, for a caller that has built the model itself.

Order (each step fails before the expensive ones that follow):
1. the output folder: refused when another run holds or records it (`vlm.train.run_folder`), in seconds;
2. the seed (`transformers.set_seed`): new modules (the projector) start the same in every process and run;
3. the model, tokenizer and image processor, trainable parameters set for the stage
   (`vlm.train.model_setup.build_for_training`), and the chat template (`vlm.train.dataset.template_for`);
4. `fit`: lock the folder and record the run, find the checkpoint to resume, validate the data, train
   (`vlm.train.trainer.VLMTrainer`), save the model, then draw the loss curve.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from vlm.train.config import RunConfig

__all__ = ["RunConfig", "RunResult", "fit", "run"]


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: where, what it trained, and the trained objects (for evaluation in the same process)."""
    output_dir: str  # checkpoints, metrics.jsonl, loss.png, data_report.json, vlm_run.json
    model_dir: str  # the trained model folder (the output folder unless `RunConfig.final_dir`)
    template: str
    global_step: int  # the optimizer step the run ended at
    resumed_from: str | None  # the checkpoint it continued from
    train_runtime: float | None  # seconds this process trained (None: nothing was trained, a finished run)
    metrics: dict  # the last logged training metrics (loss, lr, ...); {} when none were logged
    trainer: Any  # the `VLMTrainer`: `.model` is the trained model

    @property
    def model(self):
        return self.trainer.model

    @property
    def tokenizer(self):
        return self.trainer.processing_class

    @property
    def image_processor(self):
        return self.trainer.image_processor


def run(config: RunConfig) -> RunResult:
    """Build the model `config` describes, train it on its data and save it; returns where and what."""
    from transformers import set_seed

    from vlm.train.dataset import template_for
    from vlm.train.model_setup import build_for_training
    from vlm.train.run_folder import FolderLock, check_run_record, check_something_to_resume, run_record
    from vlm.train.trainer import init_deepspeed_comm

    training = config.training
    # Before the model is built: a folder holding or running another run is refused in seconds, not after loading.
    if config.main_process:
        FolderLock(training.output_dir).check()
    check_run_record(training.output_dir, run_record(config.model, config.data, training),
                     overwrite=training.overwrite_output_dir,
                     resume_given=training.resume_from_checkpoint is not None)
    check_something_to_resume(training.output_dir, training.resume_from_checkpoint,
                              overwrite=training.overwrite_output_dir)
    set_seed(training.seed)
    init_deepspeed_comm(training)  # ZeRO-3 shards the model as it is built
    model, tokenizer, image_processor = build_for_training(config.model, config.data, training)
    template = template_for(config.data, config.model, tokenizer, cache_dir=training.cache_dir)
    return fit(model, tokenizer, image_processor, config, template=template)


def fit(model, tokenizer, image_processor, config: RunConfig, *, template: str) -> RunResult:
    """Validate the data, train `model` (trainable flags already set), save it to `config.model_dir`, then plot
    the loss.

    The output folder is checked and locked first (`vlm.train.run_folder`): a folder recording other defining
    flags is refused, and the run's are recorded. The newest intact checkpoint there is resumed; a run whose
    checkpoint is at its last step is finished and only its final model is (re)written from that checkpoint.
    """
    from vlm.train.run_folder import FolderLock, check_run_record, run_record, start_run_folder

    out, training = config.training.output_dir, config.training
    record = run_record(config.model, config.data, training)
    overwrite = training.overwrite_output_dir
    check_run_record(out, record, overwrite=overwrite, resume_given=training.resume_from_checkpoint is not None)
    lock = FolderLock(out) if config.main_process else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            start_run_folder(out, record, overwrite=overwrite)
        return _fit_locked(model, tokenizer, image_processor, config, template=template)
    finally:
        if lock is not None:
            lock.release()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _find_resume(config: RunConfig) -> str | None:
    """`--resume_from_checkpoint` (checked), else the newest intact checkpoint in the output folder unless
    `--overwrite_output_dir`; process 0 sets damaged ones aside before the others look."""
    from vlm.train.run_folder import check_checkpoint, find_resume_checkpoint

    training, out = config.training, config.training.output_dir
    resume = training.resume_from_checkpoint
    if resume is not None:
        check_checkpoint(resume)
        return resume
    if training.overwrite_output_dir:
        return None
    _barrier()  # overwrite's removals are done
    if config.main_process:
        resume = find_resume_checkpoint(out, set_aside=True)
    _barrier()
    if not config.main_process:
        resume = find_resume_checkpoint(out)
    if resume is not None and config.main_process:
        print(f"resuming from {resume} (found in --output_dir)", flush=True)
    return resume


def _evaluation(config: RunConfig, model, tokenizer, image_processor, template: str):
    """(eval dataset, generation metric) of `--eval_data_path` / `--eval_generation_samples` (vlm.train.evaluation);
    (None, None) without eval data."""
    from vlm.train.evaluation import GenerationEval, build_eval_dataset
    from vlm.train.trainer import unwrap

    training = config.training
    if not config.data.eval_data_path:
        return None, None
    dataset = build_eval_dataset(config.data, training, tokenizer, image_processor,
                                 unwrap(model).vlm_config.num_image_tokens, template)
    generation = None
    if training.eval_generation_samples:
        generation = GenerationEval(dataset, training.eval_generation_samples, training.eval_metric,
                                    template=template, batch_size=training.per_device_eval_batch_size,
                                    references_field=config.data.eval_references_field)
    return dataset, generation


def _fit_locked(model, tokenizer, image_processor, config: RunConfig, *, template: str) -> RunResult:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

    from vlm.data.collate import DataCollator, PackingCollator
    from vlm.train.callbacks import LOSS_PLOT, METRICS_FILE, MetricsCallback, ProgressBarCallback, plot_loss, \
        truncate_metrics
    from vlm.train.data_drops import data_drops_callbacks, raise_if_stopped
    from vlm.train.dataset import build_train_dataset
    from vlm.train.model_setup import count_parameters
    from vlm.train.run_folder import checkpoint_step, finished_step
    from vlm.train.checkpointing import STAGING_DIR
    from vlm.train.trainer import VLMTrainer, unwrap

    training, out = config.training, config.training.output_dir
    dpo = training.method == "dpo"  # preference pairs (vlm.train.dpo)
    resume = _find_resume(config)
    if config.main_process:
        truncate_metrics(os.path.join(out, METRICS_FILE), checkpoint_step(resume))
    done = finished_step(resume) if resume is not None else None

    # A finished run needs no data: its model is the checkpoint's.
    dataset = None if done else build_train_dataset(config.data, training, tokenizer, image_processor,
                                                    unwrap(model).vlm_config.num_image_tokens, template,
                                                    preference=dpo)
    eval_dataset, generation_eval = (None, None) if done else _evaluation(config, model, tokenizer, image_processor,
                                                                          template)
    trainable, total = count_parameters(model)
    unwrap(model).supervised_only_loss = training.supervised_only_loss  # vlm.llm.loss: same loss, no (B, T, V) logits
    collator = (PackingCollator(tokenizer.pad_token_id, max_length=training.model_max_length) if training.packing
                else DataCollator(pad_token_id=tokenizer.pad_token_id))
    trainer_class, method_kwargs = VLMTrainer, {}
    if dpo:
        from vlm.data.preference import PreferenceCollator
        from vlm.train.dpo import DPOSettings, DPOTrainer

        collator = PreferenceCollator(tokenizer.pad_token_id,
                                      packing_max_length=training.model_max_length if training.packing else None)
        trainer_class, method_kwargs = DPOTrainer, {"dpo": DPOSettings.from_args(training)}
    if config.main_process:
        print(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable; template {template!r}",
              flush=True)

    trainer = trainer_class(
        model=model, args=training, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=collator, generation_eval=generation_eval,
        image_processor=image_processor, template=template, lora=training.lora_enable,
        save_projector=config.model.tune_mm_mlp_adapter, **method_kwargs,
        callbacks=[MetricsCallback(), *data_drops_callbacks(dataset, config.data.max_drop_ratio,
                                                            os.path.join(out, "data_report.json"))],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ProgressBarCallback())

    staging = os.path.join(out, STAGING_DIR)
    if config.main_process and os.path.isdir(staging):
        shutil.rmtree(staging)  # what a killed run left half-written
    runtime = None
    if done:
        # transformers' Trainer resumed at its last step trains one step more: load the checkpoint instead
        if config.main_process:
            print(f"training already finished at step {done} ({resume}); writing its final model to "
                  f"{config.model_dir} (--overwrite_output_dir to train again)", flush=True)
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        best = trainer.state.best_model_checkpoint
        if training.load_best_model_at_end and best is not None and os.path.isdir(best):
            trainer._load_best_model()  # the final model is the best checkpoint's, as when training ended
    else:
        runtime = trainer.train(resume_from_checkpoint=resume).metrics.get("train_runtime")
        raise_if_stopped(trainer)  # too many unusable images: a checkpoint, no final model
    trainer.save_model(config.model_dir)  # first the model, then the plot: a plotting failure loses nothing
    if config.main_process:
        plot_loss(os.path.join(out, METRICS_FILE), os.path.join(out, LOSS_PLOT))
    metrics = next((log for log in reversed(trainer.state.log_history) if "loss" in log), {})
    return RunResult(output_dir=out, model_dir=config.model_dir, template=template,
                     global_step=trainer.state.global_step, resumed_from=resume, train_runtime=runtime,
                     metrics=dict(metrics), trainer=trainer)
