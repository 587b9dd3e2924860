"""The embedded demo: train a tiny VLM from scratch on synthetic shapes, on a CPU, and show that it reads images.

`python train.py` (no arguments), `python train.py --demo [flags]` or `vlm demo [flags]`:
1. generate the synthetic set (`vlm.data.synth`): 1-3 coloured shapes per picture, questions about
   colour, shape, count and existence, train and held-out splits by image;
2. train a byte-level BPE tokenizer on the set's text and build a tiny VLM from configs (SigLIP-style
   tower, MLP projector, Qwen2-style decoder; random weights, nothing downloaded);
3. train it as every run is trained, through `vlm.train.run.run`: the untrained model is saved to
   `init/` and the run starts from that folder (full weights, projector on its own learning rate,
   ChatML template);
4. evaluate held-out exact match, and a blind baseline: the same model with the images shuffled across
   the held-out samples; a model that reads the picture scores far above it.

Design choices (measured on 2 CPU cores; figures in the Training issue's note):
- Each picture is a 3x3 grid of 16-px cells with at most one centred shape per cell, and the tower's
  16-px patches are the cells: a shape is one image token, 9 tokens per image, so a step is cheap.
- The tower stays frozen at random init; the projector reads its patch embeddings (`select_layer=0`),
  from which shape and colour are linearly decodable (a linear probe scores 100%). A trainable tower
  and later random layers both learned slower.
- What the decoder must learn is to find the token a question names (colour -> shape, shape ->
  colour, colour+shape -> yes/no); that binding is the slow part: held-out accuracy sits near 0.7 for
  3000 steps, then climbs (0.95 at 6000). Hence many steps of a small batch, on fresh images.

- One torch thread by default (`--threads`): for a model this small, two threads on 2 cores gain
  little when the machine is idle (bench/RESULTS.md: 19-21 steps/s against 15-16) and lose almost
  everything when other work runs, each step waiting for a descheduled thread (0.8-1.7 steps/s
  against 10-13 at load 3-6).
- Nothing is lost to an interruption: the generated set is kept and reused when complete
  (`data/complete.json`), a checkpoint is saved every `--save_steps`, and the same command continues
  from the newest one to the same last step; Ctrl-C prints where it will resume and exits 130.

Where: the run folder is `demo_dir()`: `--output_dir`, else `$VLM_DEMO_DIR`, else `./runs/demo`; it is
printed at the start and the end. Outputs (DESIGN.md, Demo outputs) in it: `model/` (a vlm model
folder), `metrics.jsonl`, `loss.png`, `eval.json`, `data/`, `init/` (the untrained model the run starts
from), `checkpoint-N/`, `demo_config.json`, `vlm_run.json`; the
last printed line is `accuracy=<a> blind_accuracy=<b>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

DEFAULT_RUN_DIR = "runs/demo"  # under the current folder, unless --output_dir or $VLM_DEMO_DIR says otherwise
DEMO_DIR_ENV = "VLM_DEMO_DIR"
TEMPLATE = "chatml"
# torch threads for the demo: on 2 cores, 2 threads are ~1.3x faster while the machine is idle but 8-15x
# slower once other work runs (bench/RESULTS.md); 1 thread keeps the promised time on a busy machine
DEFAULT_THREADS = 1


def demo_dir(run_dir: str | os.PathLike | None = None) -> str:
    """The demo's run folder, absolute: `run_dir` when given, else `$VLM_DEMO_DIR`, else `./runs/demo`.

    The environment is read when this is called (by `main()`, `test.py`, `vlm ask`), never at import.
    """
    chosen = run_dir if run_dir is not None else (os.environ.get(DEMO_DIR_ENV) or DEFAULT_RUN_DIR)
    return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def demo_model_dir(run_dir: str | os.PathLike | None = None) -> str:
    """The demo's model folder (`<demo_dir>/model`), whether or not it has been trained yet."""
    return os.path.join(demo_dir(run_dir), "model")


@dataclass
class DemoConfig:
    run_dir: str | None = None  # None: demo_dir() decides
    n_train: int = 40000
    n_eval: int = 300
    image_size: int = 48
    grid: int | None = 3
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 1
    llm_hidden: int = 128
    llm_layers: int = 2
    questions_per_image: int = 2
    multi_turn: bool = False
    select_layer: int = 0
    projector: str = "mlp2x_gelu"
    max_steps: int = 8000
    batch_size: int = 16
    learning_rate: float = 1e-3
    projector_lr: float = 1e-3
    vision_lr: float = 1e-3
    train_vision: bool = False
    seed: int = 0
    save_steps: int = 500  # a checkpoint every so many steps: what an interrupted run resumes from
    threads: int = DEFAULT_THREADS


def build_demo_model(config: DemoConfig, tokenizer):
    """The tiny VLM: a SigLIP-style tower, an MLP projector and a Qwen2-style decoder, random weights drawn
    from `config.seed` (the global random state is left as it was)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _build_demo_model(config, tokenizer)


def _build_demo_model(config: DemoConfig, tokenizer):
    import vlm
    from vlm.tiny import tiny_llm_config, tiny_vision_config

    vision = tiny_vision_config("siglip", hidden_size=config.vision_hidden, image_size=config.image_size,
                                patch_size=config.patch_size, num_layers=config.vision_layers)
    llm = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=config.llm_hidden,
                          num_layers=config.llm_layers)
    model_config = vlm.VLMConfig(
        vision=vlm.VisionConfig(hf_config=vision.to_dict(), select_layer=config.select_layer, select_feature="patch",
                                frozen=not config.train_vision),
        projector=vlm.ProjectorConfig(type=config.projector),
        llm=vlm.LLMConfig(hf_config=llm.to_dict()),
    )
    return vlm.build_model(model_config, tokenizer=tokenizer)


def merge_questions_per_image(records: list[dict]) -> list[dict]:
    """Single-question LLaVA records -> one multi-turn record per image (`<image>` in the first turn only)."""
    by_image: dict[str, dict] = {}
    for record in records:
        question, answer = record["conversations"]
        merged = by_image.setdefault(record["image"], {"id": record["image"], "image": record["image"],
                                                       "conversations": []})
        text = question["value"] if not merged["conversations"] else question["value"].replace("<image>", "").strip()
        merged["conversations"] += [{"from": "human", "value": text}, answer]
    return list(by_image.values())


# Settings that change what is trained: a checkpoint made with other values cannot be resumed.
RUN_SETTINGS_FILE = "demo_config.json"
_NOT_RUN_SETTINGS = ("run_dir", "threads", "n_eval", "save_steps")


def run_demo(config: DemoConfig) -> dict:
    """Generate data, train, evaluate; returns the eval dict (also written to `eval.json`).

    Resumable: the generated set is kept (reused when complete, `vlm.data.synth`), checkpoints are saved
    every `save_steps`, and a rerun with the same settings continues from the newest one to the same end.
    Sets torch's thread count to `config.threads` (0: leaves it) for the run and restores it after.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(replace(config, run_dir=demo_dir(config.run_dir)))
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(config: DemoConfig) -> dict:
    import torch

    import vlm
    from vlm.data.synth import generate_shapes_dataset
    from vlm.data.tokenizer import build_tokenizer
    from vlm.eval.evaluate import evaluate_exact_match
    from vlm.folders.kinds import load_tokenizer
    from vlm.folders.weights import save_model_folder
    from vlm.train.callbacks import METRICS_FILE, truncate_metrics
    from vlm.train.run import run
    from vlm.train.run_folder import checkpoint_step
    from vlm.visual.processor import ImageProcessor

    start = time.perf_counter()
    run_dir = config.run_dir
    print(f"demo: run folder {run_dir} (--output_dir or ${DEMO_DIR_ENV} to change); "
          f"{torch.get_num_threads()} torch thread(s) (--threads to change)", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    resume = check_resumable(config)
    truncate_metrics(os.path.join(run_dir, METRICS_FILE), checkpoint_step(resume))

    data_dir = os.path.join(run_dir, "data")
    info = generate_shapes_dataset(data_dir, n_train=config.n_train, n_eval=config.n_eval,
                                   image_size=config.image_size, seed=config.seed,
                                   questions_per_image=config.questions_per_image, grid=config.grid, reuse=True)
    if info["reused"]:
        print(f"demo: reusing the complete generated set in {data_dir}", flush=True)
    with open(info["train"], encoding="utf-8") as f:
        train_records = json.load(f)
    if config.multi_turn:  # one conversation per training image: the image is encoded once for all its questions
        train_records = merge_questions_per_image(train_records)
        info["train"] = os.path.join(data_dir, "train_conversations.json")
        with open(info["train"], "w", encoding="utf-8") as f:
            json.dump(train_records, f)
    if resume is not None:  # the checkpoint's own tokenizer: its ids are the ones the weights were trained on
        tokenizer = load_tokenizer(resume)
    else:
        texts = [turn["value"].replace("<image>", "") for r in train_records for turn in r["conversations"]]
        tokenizer = build_tokenizer(texts, vocab_size=512, model_max_length=256)
    print(f"demo: {len(train_records)} training questions on {info['n_train_images']} images, "
          f"{info['n_eval_samples']} held-out questions; {config.max_steps} steps, a checkpoint every "
          f"{config.save_steps}", flush=True)
    model_dir = os.path.join(run_dir, "model")
    if checkpoint_step(resume) >= config.max_steps and os.path.isfile(os.path.join(model_dir, "config.json")):
        # A finished run: evaluate its model again (resuming transformers' Trainer at max_steps would
        # train one step more).
        print(f"demo: training already finished ({resume}); evaluating {model_dir}", flush=True)
        model = vlm.from_pretrained(model_dir)
        tokenizer = load_tokenizer(model_dir)
        image_processor = ImageProcessor.from_pretrained(model_dir)
        steps, runtime = 0, None
    else:
        # The untrained model, saved where the run starts from (a vlm model folder, as for any run).
        init_dir = os.path.join(run_dir, "init")
        model = build_demo_model(config, tokenizer)
        save_model_folder(init_dir, model, tokenizer=tokenizer, image_processor=ImageProcessor.from_vision_config(
            model.vision_tower.model.config, aspect_ratio="resize"))
        # The run resumes from the newest checkpoint in run_dir and writes the model folder (weights,
        # tokenizer, image processor, template) into model/.
        result = run(run_config(config, init_dir, info, resume=resume))
        model, tokenizer, image_processor = result.model, result.tokenizer, result.image_processor
        runtime, steps = result.train_runtime, result.global_step - checkpoint_step(resume)

    with open(info["eval"], encoding="utf-8") as f:
        eval_records = json.load(f)
    result = evaluate_exact_match(model, tokenizer, image_processor, eval_records, info["image_folder"],
                                  template=TEMPLATE, seed=config.seed)
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    result["train_steps"] = steps
    result["train_steps_per_s"] = round(steps / runtime, 2) if runtime and steps else None
    result["threads"] = torch.get_num_threads()
    result["resumed_from"] = resume
    result["data_reused"] = info["reused"]
    result["config"] = asdict(config)
    with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    for kind, scores in result["per_question_type"].items():
        print(f"  {kind:<7} accuracy={scores['accuracy']:.3f} blind={scores['blind_accuracy']:.3f} n={scores['n']}")
    speed = f" ({steps} steps at {result['train_steps_per_s']} steps/s)" if steps else ""
    print(f"demo finished in {result['wall_time_s']:.0f}s{speed}; model in {model_dir}", flush=True)
    print(f"accuracy={result['accuracy']:.4f} blind_accuracy={result['blind_accuracy']:.4f}", flush=True)
    return result


def run_config(config: DemoConfig, init_dir: str, data: dict, *, resume: str | None):
    """The demo's `RunConfig`: stage 2 from `init_dir` (every weight trains, the tower only with
    `train_vision`), the generated set, ChatML, many small steps with a cosine schedule."""
    from vlm.train.arguments import DataArguments, ModelArguments, VLMTrainingArguments
    from vlm.train.config import RunConfig

    model = ModelArguments(model_name_or_path=init_dir, unfreeze_vision_tower=config.train_vision)
    data = DataArguments(data_path=data["train"], image_folder=data["image_folder"], version=TEMPLATE,
                         image_aspect_ratio="resize", check_images="exists")
    training = VLMTrainingArguments(
        output_dir=config.run_dir, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, mm_projector_lr=config.projector_lr,
        mm_vision_tower_lr=config.vision_lr, weight_decay=0.0, warmup_steps=0.03, lr_scheduler_type="cosine",
        logging_steps=20, save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
        report_to="none", seed=config.seed, use_cpu=True, dataloader_num_workers=0, model_max_length=256,
        disable_tqdm=False,
        # check_resumable has compared the settings: continue its checkpoint, or start over when there is none
        resume_from_checkpoint=resume, overwrite_output_dir=resume is None,
    )
    return RunConfig(model=model, data=data, training=training, final_dir=os.path.join(config.run_dir, "model"))


def check_resumable(config: DemoConfig) -> str | None:
    """The checkpoint a rerun continues from (None: start afresh), after checking it was made with the same
    settings; records the settings for the next run. Raises FolderError naming the first difference."""
    from vlm.errors import FolderError
    from vlm.train.run_folder import find_resume_checkpoint

    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_RUN_SETTINGS}
    path = os.path.join(config.run_dir, RUN_SETTINGS_FILE)
    resume = find_resume_checkpoint(config.run_dir, set_aside=True)  # a damaged newest one: the one before
    if resume is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        defaults = asdict(DemoConfig())  # a setting added since the run was made: it ran with the default
        changed = [k for k in settings if saved.get(k, defaults[k]) != settings[k]]
        if changed:
            k = changed[0]
            raise FolderError(f"{config.run_dir} holds a demo run with {k}={saved.get(k, defaults[k])!r}, "
                             f"not {settings[k]!r}, "
                             f"so {resume} cannot be resumed: pass the same settings, another --output_dir, "
                             "or delete the folder")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    return resume


def ensure_demo_model(run_dir: str | os.PathLike | None = None) -> str:
    """The demo model folder (`demo_model_dir(run_dir)`), training the demo first (and saying so on stderr)
    when it is missing."""
    run_dir = demo_dir(run_dir)
    model_dir = demo_model_dir(run_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"no demo model in {model_dir}: training it first (about 9 minutes on 2 CPU cores; `vlm demo --help`)",
              file=sys.stderr, flush=True)
        run_demo(DemoConfig(run_dir=run_dir))
    return model_dir


FLAG_HELP = {
    "run_dir": f"run folder (data, checkpoints, model/, eval.json); default ${DEMO_DIR_ENV} or ./{DEFAULT_RUN_DIR}",
    "threads": "torch CPU threads for the demo (0: torch's default, one per core); on 2 cores 2 threads are "
               "~1.3x faster when the machine is idle, 8-15x slower when it is busy",
    "save_steps": "save a checkpoint every N steps; a rerun of the same command resumes from the newest",
    "n_train": "training images (each asks questions_per_image questions)",
    "n_eval": "held-out images",
    "max_steps": "optimizer steps",
    "batch_size": "samples per step",
    "seed": "same seed, same data and initial weights",
    "image_size": "side of the square synthetic pictures, in pixels",
    "grid": "pictures are a GRID x GRID layout of cells, at most one shape per cell",
    "patch_size": "vision tower patch side in pixels (image_size / patch_size patches per side)",
    "vision_hidden": "vision tower width",
    "vision_layers": "vision tower layers",
    "llm_hidden": "language model width",
    "llm_layers": "language model layers",
    "questions_per_image": "questions asked about each training picture",
    "multi_turn": "True: a picture's questions form one conversation (the image is encoded once for all)",
    "select_layer": "vision tower hidden_states index the projector reads (0: the patch embeddings)",
    "projector": "projector type; e.g. pixel_shuffle2_mlp2x_gelu merges 2x2 patches, 4x fewer image tokens "
                 "(needs an even number of patches per side: --patch_size 8)",
    "learning_rate": "language model learning rate",
    "projector_lr": "projector learning rate",
    "vision_lr": "vision tower learning rate (with --train_vision True)",
    "train_vision": "True: train the vision tower too (it stays frozen at random init by default)",
}


def build_parser() -> argparse.ArgumentParser:
    """`vlm demo` flags: one per DemoConfig field (`--output_dir` for `run_dir`), defaults shown."""
    parser = config_parser("vlm demo", __doc__.split("\n\n")[0], DemoConfig(), FLAG_HELP)
    parser.epilog = "vlm demo --preference: this demo cut short, then DPO from it (vlm demo --preference --help)"
    return parser


def config_parser(prog: str, description: str, config, flag_help: dict[str, str]) -> argparse.ArgumentParser:
    """A parser with one flag per field of the dataclass `config` (`--output_dir` for `run_dir`), its values as
    the defaults (shown), `flag_help` as the help (the demo's and the preference demo's flags)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, value in asdict(config).items():
        flags = ["--output_dir"] if name == "run_dir" else [f"--{name}"]
        kind = str if name == "run_dir" else (type(value) if value is not None else int)
        help_ = flag_help.get(name, "demo setting") + ("" if name == "run_dir" else " (default: %(default)s)")
        if kind is bool:
            parser.add_argument(*flags, dest=name, type=lambda s: s.lower() in ("1", "true", "yes"), default=value,
                                help=help_)
        else:
            parser.add_argument(*flags, dest=name, type=kind, default=value, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DemoConfig(**vars(args))
    from vlm.train.run_folder import report_interrupted

    try:
        run_demo(config)
    except KeyboardInterrupt:
        return report_interrupted(demo_dir(config.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
