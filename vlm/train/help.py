"""`python train.py --help`: the vision-language flags first, grouped, generated from the argument dataclasses.

`HfArgumentParser`'s own help lists all ~120 `transformers.TrainingArguments` flags in declaration order,
so the flags this project adds end up hundreds of lines down. This text shows vlm's own flags (the
fields of `ModelArguments`, `DataArguments` and `VLMTrainingArguments` that transformers does not
define) grouped by job, each once with its aliases as "also: ...", then the handful of transformers
flags most runs set and a pointer to the rest, then examples. Help strings and defaults come from the
dataclass fields, so the text cannot drift from what parses; an own field missing from `GROUPS` still
shows, under "other". `--help-all` prints the parser's full list.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing

import transformers

TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"

# (title, field names) in the order shown; an own field not named here is shown under "other". What trains
# (stages, LoRA) comes before the data flags so that the LoRA flags are on the first screen.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("model_name_or_path", "vision_tower", "mm_projector_type", "mm_vision_select_layer",
               "mm_vision_select_feature", "pretrain_mm_mlp_adapter", "model_weights", "attn_implementation",
               "trust_remote_code", "cache_dir", "overwrite_output_dir")),
    ("stages: what trains, at which learning rate", ("tune_mm_mlp_adapter", "freeze_backbone", "unfreeze_vision_tower",
                                                    "freeze_mm_mlp_adapter", "mm_projector_lr", "mm_vision_tower_lr")),
    ("LoRA and QLoRA", ("lora_enable", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_bias",
                        "lora_weight_path", "bits", "quant_type", "double_quant")),
    ("data", ("data_path", "image_folder", "data_format", "version", "image_aspect_ratio", "image_map",
              "captions_file", "model_max_length", "truncate", "max_drop_ratio", "check_images",
              "allow_absolute_image_paths", "escape_special_tokens", "group_by_modality_length",
              "packing", "supervised_only_loss")),
    ("evaluation (with transformers' --eval_steps, --metric_for_best_model, --load_best_model_at_end)",
     ("eval_data_path", "eval_image_folder", "eval_generation_samples", "eval_metric", "eval_references_field")),
    ("preference training (DPO; TRL's flags)", ("method", "beta", "loss_type", "label_smoothing", "rpo_alpha",
                                                 "precompute_ref_log_probs", "simpo_gamma")),
    ("accepted for LLaVA's scripts and older transformers", ("mm_use_im_start_end", "mm_use_im_patch_token",
                                                             "lazy_preprocess", "is_multimodal",
                                                             "evaluation_strategy", "warmup_ratio")),
]

# The transformers flags most runs set (all of them are accepted), with a short text of our own: theirs
# run to several sentences each.
COMMON_TRANSFORMERS_FLAGS: dict[str, str] = {
    "output_dir": "where checkpoints and the model folder are written",
    "num_train_epochs": "passes over the data",
    "max_steps": "optimizer steps to run (overrides --num_train_epochs)",
    "per_device_train_batch_size": "samples per device per step",
    "gradient_accumulation_steps": "steps summed per optimizer update",
    "learning_rate": "peak learning rate (see --mm_projector_lr)",
    "bf16": "bfloat16 mixed precision (CUDA; on CPU the run stays float32)",
    "gradient_checkpointing": "recompute activations in backward: less memory, ~20% slower",
    "save_steps": "checkpoint every N steps; resuming takes the newest",
    "save_total_limit": "keep only the newest N checkpoints",
    "logging_steps": "log loss and learning rate every N steps",
    "report_to": "none | tensorboard | wandb | ...",
    "deepspeed": "DeepSpeed config file; zero2 / zero3 (or LLaVA's ./scripts/zero3.json) name the ones vlm ships",
}

EXAMPLES = """\
examples:
  # stage 1: only the projector trains, on captions
  python train.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
    --vision_tower openai/clip-vit-large-patch14-336 --tune_mm_mlp_adapter True --version plain \\
    --data_path blip_558k.json --image_folder images --output_dir runs/stage1 --learning_rate 1e-3
  # stage 2 on 8 GPUs: conversations, LoRA on the LLM, the stage-1 projector at its own rate
  NPROC_PER_NODE=8 bash train.sh --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
    --vision_tower openai/clip-vit-large-patch14-336 --lora_enable True --lora_r 128 \\
    --pretrain_mm_mlp_adapter runs/stage1/mm_projector.safetensors --mm_projector_lr 2e-5 \\
    --data_path llava_v1_5_mix665k.json --image_folder data --output_dir runs/stage2 --bf16 True
  python train.py --config run.yaml --learning_rate 1e-4    # a file's flags, one of them overridden"""


def own_fields(sections: tuple[type, ...]) -> list[tuple[type, dataclasses.Field]]:
    """Fields of the argument classes (`vlm.train.arguments`: model, data, training) that transformers'
    TrainingArguments does not define."""
    theirs = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return [(cls, f) for cls in sections for f in dataclasses.fields(cls)
            if not (issubclass(cls, transformers.TrainingArguments) and f.name in theirs)]


def _metavar(cls: type, field: dataclasses.Field) -> str:
    kind = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    kind = args[0]
    if kind is bool:
        return ""  # a bare --flag is True; --flag False (see the header)
    if kind is int:
        return "INT"
    if kind is float:
        return "FLOAT"
    if field.name.endswith(("_path", "_folder", "_dir", "_file", "_map", "_adapter", "_weights", "tower")):
        return "PATH"
    return "STR"


def _default_note(field: dataclasses.Field, help_: str, *, always: bool = False) -> str:
    if field.default is dataclasses.MISSING or "default" in help_:
        return ""
    if not always and field.default in (None, "", False):
        return ""
    return f" (default {field.default})"


def _entry(flag: str, text: str, width: int, column: int = 32) -> list[str]:
    """`  --flag METAVAR   text`, the text wrapped at `width` and indented to `column` (a flag too long for the
    column has its text after it when that fits on the line, else on the lines below)."""
    head = f"  {flag}"
    indent = " " * column
    if len(head) >= column - 1 and len(head) + 2 + len(text) <= width:
        return [f"{head}  {text}"]
    if len(head) < column - 1:
        return textwrap.wrap(text, width, initial_indent=head.ljust(column), subsequent_indent=indent) or [head]
    return [head] + textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent)


def _field_entry(cls: type, field: dataclasses.Field, width: int, *, always_default: bool = False) -> list[str]:
    help_ = field.metadata.get("help", "")
    aliases = field.metadata.get("aliases", [])
    also = f" (also: {', '.join(aliases)})" if aliases else ""
    text = help_ + _default_note(field, help_, always=always_default) + also
    return _entry(f"--{field.name} {_metavar(cls, field)}".rstrip(), text, width)


def help_text(sections: tuple[type, ...], width: int = 100) -> str:
    """The curated `--help` text (see the module docstring) of the argument classes `sections` (model, data,
    training: `vlm.train.arguments` passes its own); lines at most `width` characters."""
    VLMTrainingArguments = sections[-1]  # noqa: N806 (the training class: transformers' flags and ours)
    fields = {f.name: (cls, f) for cls, f in own_fields(sections)}
    lines = [
        "usage: python train.py [--config FILE] --output_dir DIR [--flag VALUE ...]   (torchrun: train.sh)",
        "       python train.py [--demo [demo flags]]   (the demo; its flags: vlm demo --help)",
        "",
        "Train a LLaVA-style vision-language model. Flags take LLaVA's, transformers' and Basic-VLM's names;",
        "a bare boolean --flag is True, --flag False is False. --help-all: every flag.",
        "",
    ]
    lines += _entry("--config FILE", "YAML or JSON mapping of flag names to values (without the --); flags given on "
                    "the command line override it", width)
    shown = set()
    groups = list(GROUPS)
    rest = tuple(name for name in fields if not any(name in names for _, names in GROUPS))
    if rest:
        groups.append(("other", rest))
    for title, names in groups:
        lines += ["", f"{title}:"]
        for name in names:
            if name in fields and name not in shown:
                shown.add(name)
                lines += _field_entry(*fields[name], width)

    theirs = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(VLMTrainingArguments)}
    lines += ["", "transformers TrainingArguments: all are accepted; the most used below, every one with --help-all or",
              f"  {TRAINING_ARGUMENTS_DOCS}"]
    for name, text in COMMON_TRANSFORMERS_FLAGS.items():
        field = ours[name]
        flag = f"--{name} {_metavar(VLMTrainingArguments, field)}".rstrip()
        lines += _entry(flag, text + _default_note(field, text), width)
    changed = [f for name, f in ours.items() if name in theirs and f.default != theirs[name].default]
    if changed:
        lines += ["  vlm's defaults where they differ from transformers':"]
        for field in changed:
            lines += _field_entry(VLMTrainingArguments, field, width, always_default=True)
    lines += ["", EXAMPLES]
    return "\n".join(lines) + "\n"
