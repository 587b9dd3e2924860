"""`python train.py [--config FILE] [--flag value ...]`: parse, build, validate data, train, save.

With no arguments it runs the embedded demo (`vlm.demo`). Under `torchrun` every process runs this;
`transformers.Trainer` (through accelerate) sets up the process group from the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from vlm.data.mix import Source, parse_sources


def build_sources(data_args) -> list[Source]:
    """`--data_path/--image_folder/--data_format`, or Basic-VLM's `--captions_file` + `--image_map`."""
    if data_args.captions_file:
        from vlm.data.formats.basic_vlm import image_folder_and_options

        folder, options = image_folder_and_options(data_args.captions_file, data_args.image_map,
                                                   data_args.image_folder)
        if "image_root" in options:  # Basic-VLM's train.sh: the image map's `path` fields say where images are
            print(f"data: no --image_folder; images are found at the image map's 'path' folders (under {folder})",
                  flush=True)
        return [Source(path=data_args.captions_file, image_folder=folder, format="basic_vlm", options=options,
                       allow_absolute_images=data_args.allow_absolute_image_paths)]
    if not data_args.data_path:
        raise ValueError("no training data: pass --data_path (and --image_folder), or --captions_file/--image_map")
    sources = parse_sources(data_args.data_path, data_args.image_folder, data_format=data_args.data_format)
    if data_args.allow_absolute_image_paths:
        import dataclasses

        sources = [dataclasses.replace(s, allow_absolute_images=True) for s in sources]
    return sources


def build_train_dataset(data_args, training_args, tokenizer, image_processor, num_image_tokens: int,
                        template: str):
    """Validate every sample as training will use it, write the report, stop when too much is dropped."""
    from vlm.data.check import check_dataset, enforce_max_drop_ratio
    from vlm.data.dataset import SupervisedDataset
    from vlm.data.mix import MixedRecords

    records = MixedRecords(build_sources(data_args), seed=training_args.seed)
    kept, report = check_dataset(records, tokenizer=tokenizer, template=template, num_image_tokens=num_image_tokens,
                                 max_length=training_args.model_max_length, truncate=data_args.truncate,
                                 check_images=data_args.check_images, seed=training_args.seed,
                                 # every rank checks (each needs the kept indices): share the CPUs
                                 num_workers=max(1, (os.cpu_count() or 1) // training_args.world_size))
    report_path = os.path.join(training_args.output_dir, "data_report.json")
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        dropped = ", ".join(f"{k}={v}" for k, v in report["dropped"].items()) or "none"
        print(f"data: {report['total']} samples, kept {report['kept']}, dropped: {dropped} "
              f"(report: {report_path})", flush=True)
    enforce_max_drop_ratio(report, data_args.max_drop_ratio, report_path=report_path)
    return SupervisedDataset(records, tokenizer, template, image_processor, num_image_tokens=num_image_tokens,
                             max_length=training_args.model_max_length, truncate=data_args.truncate, indices=kept,
                             on_bad_image="replace")  # counted and stopped by vlm.train.data_drops


def template_for(data_args, model_args, tokenizer=None, *, cache_dir: str | None = None) -> str:
    """`--version` when given; otherwise the start folder's recorded template (a vlm / LLaVA folder or LoRA
    run keeps the format it was trained on), `plain` in stage 1, the LLM's own chat template when its
    tokenizer has one, else `vicuna_v1`. The choice and its reason are printed. `cache_dir`: the Hugging Face hub
    cache a Hub-id start point is read from (`--cache_dir`)."""
    if data_args.version:
        return data_args.version
    from vlm.folders.kinds import model_kind
    from vlm.data.templates import default_template_name

    stage1 = model_args.tune_mm_mlp_adapter
    kind, folder = (model_kind(model_args.model_name_or_path, cache_dir=cache_dir) if model_args.model_name_or_path
                    else ("llm", None))
    if kind != "llm" and not stage1:
        from vlm.generate.generator import default_template

        try:
            name = default_template(folder, tokenizer)
            print(f"template: {name!r}, the one {model_args.model_name_or_path!r} was trained with "
                  "(--version to change)", flush=True)
            return name
        except ValueError:
            pass
    name = default_template_name(tokenizer, captions_stage=stage1)
    why = {"plain": "stage 1 (--tune_mm_mlp_adapter) trains on captions",
           "tokenizer": "the LLM's tokenizer has a chat template",
           "vicuna_v1": "the LLM's tokenizer has no chat template; LLaVA-1.5's default"}[name]
    print(f"template: {name!r} because {why} (--version to change)", flush=True)
    return name


def train(model_args, data_args, training_args) -> str:
    """Run one training job from flags; returns the output folder."""
    from transformers import set_seed

    from vlm.train.model_setup import build_for_training
    from vlm.train.run_folder import FolderLock, check_run_record, check_something_to_resume, run_record

    # Before the model is built: a folder holding or running another run is refused in seconds, not after loading.
    if training_args.process_index == 0:
        FolderLock(training_args.output_dir).check()
    check_run_record(training_args.output_dir, run_record(model_args, data_args, training_args),
                     overwrite=training_args.overwrite_output_dir,
                     resume_given=training_args.resume_from_checkpoint is not None)
    check_something_to_resume(training_args.output_dir, training_args.resume_from_checkpoint,
                              overwrite=training_args.overwrite_output_dir)
    set_seed(training_args.seed)  # new modules (the projector) start the same in every process and every run
    model, tokenizer, image_processor = build_for_training(model_args, data_args, training_args)
    fit(model, tokenizer, image_processor, data_args, training_args,
        template=template_for(data_args, model_args, tokenizer, cache_dir=training_args.cache_dir),
        save_projector=model_args.tune_mm_mlp_adapter, model_args=model_args)
    return training_args.output_dir


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fit(model, tokenizer, image_processor, data_args, training_args, *, template: str, save_projector: bool = False,
        final_dir: str | None = None, model_args=None):
    """Validate the data, train `model` (trainable flags already set), save it to `final_dir` (default: the
    output folder), then plot the loss; returns the trainer.

    The output folder is checked and locked first (`vlm.train.run_folder`): a folder recording other defining
    flags is refused, and the run's are recorded (`model_args`: None leaves the model flags out, as the demo
    records its own). The newest intact checkpoint there is resumed; a run whose checkpoint is at its last
    step is finished and only its final model is (re)written from that checkpoint.
    """
    from vlm.train.run_folder import FolderLock, check_run_record, run_record, start_run_folder

    out = training_args.output_dir
    record = run_record(model_args, data_args, training_args)
    overwrite = training_args.overwrite_output_dir
    check_run_record(out, record, overwrite=overwrite, resume_given=training_args.resume_from_checkpoint is not None)
    lock = FolderLock(out) if training_args.process_index == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            start_run_folder(out, record, overwrite=overwrite)
        return _fit_locked(model, tokenizer, image_processor, data_args, training_args, template=template,
                           save_projector=save_projector, final_dir=final_dir)
    finally:
        if lock is not None:
            lock.release()


def _fit_locked(model, tokenizer, image_processor, data_args, training_args, *, template: str, save_projector: bool,
                final_dir: str | None):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

    from vlm.data.collate import DataCollator
    from vlm.train.callbacks import LOSS_PLOT, METRICS_FILE, MetricsCallback, ProgressBarCallback, plot_loss, \
        truncate_metrics
    from vlm.train.data_drops import data_drops_callbacks, raise_if_stopped
    from vlm.train.model_setup import count_parameters
    from vlm.train.run_folder import check_checkpoint, checkpoint_step, find_resume_checkpoint, finished_step
    from vlm.train.trainer import STAGING_DIR, VLMTrainer, unwrap

    out = training_args.output_dir
    main_process = training_args.process_index == 0
    resume = training_args.resume_from_checkpoint
    if resume is not None:
        check_checkpoint(resume)
    elif not training_args.overwrite_output_dir:
        _barrier()  # overwrite's removals are done
        if main_process:  # it sets damaged checkpoints aside before the other processes look
            resume = find_resume_checkpoint(out, set_aside=True)
        _barrier()
        if not main_process:
            resume = find_resume_checkpoint(out)
        if resume is not None and main_process:
            print(f"resuming from {resume} (found in --output_dir)", flush=True)
    if main_process:
        truncate_metrics(os.path.join(out, METRICS_FILE), checkpoint_step(resume))
    done = finished_step(resume) if resume is not None else None

    # A finished run needs no data: its model is the checkpoint's.
    dataset = None if done else build_train_dataset(data_args, training_args, tokenizer, image_processor,
                                                    unwrap(model).vlm_config.num_image_tokens, template)
    trainable, total = count_parameters(model)
    if main_process:
        print(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable; template {template!r}",
              flush=True)
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA, stage 1) without input hacks.
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    trainer = VLMTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id),
        image_processor=image_processor, template=template, lora=training_args.lora_enable,
        save_projector=save_projector,
        callbacks=[MetricsCallback(), *data_drops_callbacks(dataset, data_args.max_drop_ratio,
                                                            os.path.join(training_args.output_dir, "data_report.json"))],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ProgressBarCallback())

    staging = os.path.join(out, STAGING_DIR)
    if main_process and os.path.isdir(staging):
        shutil.rmtree(staging)  # what a killed run left half-written
    if done:
        # transformers' Trainer resumed at its last step trains one step more: load the checkpoint instead
        if main_process:
            print(f"training already finished at step {done} ({resume}); writing its final model to "
                  f"{final_dir or out} (--overwrite_output_dir to train again)", flush=True)
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume)
        raise_if_stopped(trainer)  # too many unusable images: a checkpoint, no final model
    trainer.save_model(final_dir or out)  # first the model, then the plot: a plotting failure loses nothing
    if main_process:
        plot_loss(os.path.join(out, METRICS_FILE), os.path.join(out, LOSS_PLOT))
    return trainer


def with_shipped_deepspeed_config(argv: list[str]) -> list[str]:
    """`--deepspeed zero3` (or `zero3.json`, or LLaVA's `./scripts/zero3.json` where no such file exists) ->
    the config shipped in the package (vlm/assets/deepspeed), said on stdout; other values pass unchanged."""
    from vlm.assets import resolve_deepspeed_config

    argv = list(argv)
    for i, flag in enumerate(argv[:-1]):
        if flag == "--deepspeed":
            resolved = resolve_deepspeed_config(argv[i + 1])
            if resolved != argv[i + 1]:
                print(f"deepspeed: {argv[i + 1]!r} is vlm's shipped config {resolved}", flush=True)
                argv[i + 1] = resolved
    return argv


# transformers' TrainingArguments falls back to this folder when no --output_dir is given
TRANSFORMERS_DEFAULT_OUTPUT_DIR = "trainer_output"


def check_output_dir_given(argv: list[str], output_dir: str) -> None:
    """Training without `--output_dir` (on the command line or in `--config`) is refused: transformers would
    write into ./trainer_output, and the next run there would resume from whatever an unrelated run left."""
    if output_dir != TRANSFORMERS_DEFAULT_OUTPUT_DIR:
        return
    if any(a in ("--output_dir", "--output-dir") or a.startswith(("--output_dir=", "--output-dir=")) for a in argv):
        return
    if "--config" in argv:
        from vlm.train.arguments import _read_config_file

        if "output_dir" in _read_config_file(argv[argv.index("--config") + 1]):
            return
    raise ValueError("no --output_dir: name the folder for this run's checkpoints, model and data report "
                     "(e.g. --output_dir runs/my-run); `python train.py` with no flags runs the demo")


def report_interrupted(output_dir: str) -> int:
    """Ctrl-C: print one line on stderr, the checkpoint a rerun of the same command resumes from (`fit` finds
    the newest complete one in the output folder) or that there is none yet; returns the exit code, 130."""
    from tqdm import tqdm

    from vlm.train.run_folder import list_checkpoints

    for bar in list(getattr(tqdm, "_instances", ())):  # an open bar would be redrawn at exit, after our line
        bar.close()
    # the newest complete one (renamed into place when fully written); the rerun also checks it reads back
    resume = next(iter(list_checkpoints(output_dir)), None)
    if resume is None:
        line = (f"interrupted before the first checkpoint in {output_dir} (--save_steps sets how often); "
                "rerun the same command to start again")
    else:
        line = f"interrupted; rerun the same command to resume from {resume}"
    print(line, file=sys.stderr, flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    """`python train.py [flags]`; no arguments runs the demo, `--demo [demo flags]` the demo with its flags
    (`vlm demo --help`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "--demo":
        from vlm.demo import main as demo_main

        return demo_main(argv[1:])
    training_args = None
    try:
        from vlm.train.arguments import parse_args

        try:
            model_args, data_args, training_args = parse_args(with_shipped_deepspeed_config(argv))
            check_output_dir_given(argv, training_args.output_dir)
        except (ValueError, ImportError, FileNotFoundError) as exc:  # a flag mistake: one line, as argparse does
            print(f"train.py: error: {exc}", file=sys.stderr)
            return 2
        from vlm.data.errors import DataError
        from vlm.train.data_drops import DataDropsExceeded
        from vlm.train.run_folder import RunFolderError

        try:
            train(model_args, data_args, training_args)
        except DataError as exc:  # unreadable data file or mix file, nothing left to train on: one line
            print(f"train.py: error: {exc}", file=sys.stderr)
            return 2
        except RunFolderError as exc:  # another run's folder, a lock, a damaged checkpoint: one line
            print(f"train.py: error: {exc}", file=sys.stderr)
            return 2
        except DataDropsExceeded as exc:  # too many images unusable mid-run: stopped at a checkpoint
            if training_args.process_index == 0:  # every rank stops at the same step; one line for the run
                print(f"train.py: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            from vlm.cli import disk_full_reason

            reason = disk_full_reason(exc, argv)
            if reason is None:
                raise
            # a save that ran out of space leaves only the staged .incomplete folder, never a torn checkpoint
            print(f"train.py: error: {reason}; free space and rerun the same command to resume from the last "
                  "complete checkpoint", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # Ctrl-C: where to pick up, not a traceback
        if training_args is None:
            print("\ninterrupted", file=sys.stderr, flush=True)
            return 130
        if training_args.process_index != 0:
            return 130
        return report_interrupted(training_args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
