"""The embedded demo: train a tiny VLM from scratch on synthetic shapes, on a CPU, and show that it reads images.

`python train.py` (no arguments) or `vlm demo`:
1. generate the synthetic set (`vlm.data.synth`): 1-3 coloured shapes per picture, questions about
   colour, shape, count and existence, train and held-out splits by image;
2. train a byte-level BPE tokenizer on the set's text and build a tiny VLM from configs (SigLIP-style
   tower, MLP projector, Qwen2-style decoder; random weights, nothing downloaded);
3. train it with the same trainer and data pipeline as real runs (full weights, projector on its own
   learning rate, ChatML template);
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

Outputs (DESIGN.md, Demo outputs) in the run folder: `model/` (a vlm model folder), `metrics.jsonl`,
`loss.png`, `eval.json`, `data/`; the last printed line is `accuracy=<a> blind_accuracy=<b>`.
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
    max_steps: int = 8000
    batch_size: int = 16
    learning_rate: float = 1e-3
    projector_lr: float = 1e-3
    vision_lr: float = 1e-3
    train_vision: bool = False
    seed: int = 0
    threads: int | None = None


def build_demo_model(config: DemoConfig, tokenizer):
    """The tiny VLM: a SigLIP-style tower, an MLP projector and a Qwen2-style decoder, random weights."""
    import torch

    import vlm
    from vlm.testing import tiny_llm_config, tiny_vision_config

    torch.manual_seed(config.seed)
    vision = tiny_vision_config("siglip", hidden_size=config.vision_hidden, image_size=config.image_size,
                                patch_size=config.patch_size, num_layers=config.vision_layers)
    llm = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=config.llm_hidden,
                          num_layers=config.llm_layers)
    model_config = vlm.VLMConfig(
        vision=vlm.VisionConfig(hf_config=vision.to_dict(), select_layer=config.select_layer, select_feature="patch",
                                frozen=not config.train_vision),
        projector=vlm.ProjectorConfig(type="mlp2x_gelu"),
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


def run_demo(config: DemoConfig) -> dict:
    """Generate data, train, evaluate; returns the eval dict (also written to `eval.json`)."""
    import torch

    from vlm.data.synth import generate_shapes_dataset
    from vlm.data.tokenizer import build_tokenizer
    from vlm.evaluate import evaluate_exact_match
    from vlm.train.arguments import DataArguments, VLMTrainingArguments
    from vlm.train.cli import fit
    from vlm.visual.processor import ImageProcessor

    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    config = replace(config, run_dir=demo_dir(config.run_dir))
    print(f"demo: run folder {config.run_dir} (--output_dir or ${DEMO_DIR_ENV} to change)", flush=True)
    os.makedirs(config.run_dir, exist_ok=True)
    metrics = os.path.join(config.run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)  # a fresh curve for a fresh run
    data_dir = os.path.join(config.run_dir, "data")
    info = generate_shapes_dataset(data_dir, n_train=config.n_train, n_eval=config.n_eval,
                                   image_size=config.image_size, seed=config.seed,
                                   questions_per_image=config.questions_per_image, grid=config.grid)
    with open(info["train"], encoding="utf-8") as f:
        train_records = json.load(f)
    if config.multi_turn:  # one conversation per training image: the image is encoded once for all its questions
        train_records = merge_questions_per_image(train_records)
        info["train"] = os.path.join(data_dir, "train_conversations.json")
        with open(info["train"], "w", encoding="utf-8") as f:
            json.dump(train_records, f)
    texts = [turn["value"].replace("<image>", "") for r in train_records for turn in r["conversations"]]
    tokenizer = build_tokenizer(texts, vocab_size=512, model_max_length=256)
    model = build_demo_model(config, tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    model.vision_tower.set_trainable(config.train_vision)
    image_processor = ImageProcessor.from_vision_config(model.vision_tower.model.config, aspect_ratio="resize")
    print(f"demo: {len(train_records)} training questions on {info['n_train_images']} images, "
          f"{info['n_eval_samples']} held-out questions; {config.max_steps} steps", flush=True)

    data_args = DataArguments(data_path=info["train"], image_folder=info["image_folder"], version=TEMPLATE,
                              image_aspect_ratio="resize", check_images="exists")
    training_args = VLMTrainingArguments(
        output_dir=config.run_dir, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, mm_projector_lr=config.projector_lr,
        mm_vision_tower_lr=config.vision_lr, weight_decay=0.0, warmup_steps=0.03, lr_scheduler_type="cosine",
        logging_steps=20, save_strategy="no", report_to="none", seed=config.seed, use_cpu=True,
        dataloader_num_workers=0, model_max_length=256, disable_tqdm=False,
    )
    model_dir = os.path.join(config.run_dir, "model")
    # The trainer writes the model folder (weights, tokenizer, image processor, template) into model/.
    fit(model, tokenizer, image_processor, data_args, training_args, template=TEMPLATE, final_dir=model_dir)

    with open(info["eval"], encoding="utf-8") as f:
        eval_records = json.load(f)
    result = evaluate_exact_match(model, tokenizer, image_processor, eval_records, info["image_folder"],
                                  template=TEMPLATE, seed=config.seed)
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    result["config"] = asdict(config)
    with open(os.path.join(config.run_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    for kind, scores in result["per_question_type"].items():
        print(f"  {kind:<7} accuracy={scores['accuracy']:.3f} blind={scores['blind_accuracy']:.3f} n={scores['n']}")
    print(f"demo finished in {result['wall_time_s']:.0f}s; model in {model_dir}", flush=True)
    print(f"accuracy={result['accuracy']:.4f} blind_accuracy={result['blind_accuracy']:.4f}", flush=True)
    return result


def ensure_demo_model(run_dir: str | os.PathLike | None = None) -> str:
    """The demo model folder (`demo_model_dir(run_dir)`), training the demo first (and saying so on stderr)
    when it is missing."""
    run_dir = demo_dir(run_dir)
    model_dir = demo_model_dir(run_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"no demo model in {model_dir}: training it first (about 6 minutes on 2 CPU cores)",
              file=sys.stderr, flush=True)
        run_demo(DemoConfig(run_dir=run_dir))
    return model_dir


FLAG_HELP = {
    "run_dir": f"run folder (data, checkpoints, model/, eval.json); default ${DEMO_DIR_ENV} or ./{DEFAULT_RUN_DIR}",
    "threads": "torch CPU threads for training (0: torch's default, one per core)",
    "n_train": "training images (each asks questions_per_image questions)",
    "n_eval": "held-out images",
    "max_steps": "optimizer steps",
    "batch_size": "samples per step",
    "seed": "same seed, same data and initial weights",
}


def build_parser() -> argparse.ArgumentParser:
    """`vlm demo` flags: one per DemoConfig field (`--output_dir` for `run_dir`), defaults shown."""
    parser = argparse.ArgumentParser(prog="vlm demo", description=__doc__.split("\n\n")[0])
    for name, value in asdict(DemoConfig()).items():
        flags = ["--output_dir"] if name == "run_dir" else [f"--{name}"]
        kind = str if name == "run_dir" else (type(value) if value is not None else int)
        help_ = FLAG_HELP.get(name, "demo setting") + ("" if name == "run_dir" else " (default: %(default)s)")
        if kind is bool:
            parser.add_argument(*flags, dest=name, type=lambda s: s.lower() in ("1", "true", "yes"), default=value,
                                help=help_)
        else:
            parser.add_argument(*flags, dest=name, type=kind, default=value, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_demo(DemoConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
