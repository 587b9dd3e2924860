"""Training flags: LLaVA's names, `transformers.TrainingArguments`' names, and Basic-VLM's, parsed as users type them.

This is the one place that knows the flags' legacy names: `vlm.train.config.RunConfig.from_flags(argv)`
turns a command line, through `parse_args` here, into the typed, validated run description
`vlm.train.run.run` takes.
Its three sections (model, data, training) are the dataclasses below, parsed by
`transformers.HfArgumentParser`, so booleans accept `True`/`False` strings correctly and every
`TrainingArguments` flag works unchanged. Field names are the flag names; aliases (`--lora_rank` for
`--lora_r`, `--feature_proj_lr` for `--mm_projector_lr`, Basic-VLM's `--base_language_model`, ...) are
declared on the fields; `--config FILE` (YAML or JSON) supplies defaults that flags on the command line
override; LLaVA's `--deepspeed ./scripts/zero3.json` names the config shipped with vlm.
The model and data sections are read-only once built; the training section is transformers' own
`TrainingArguments` (the Trainer writes to it), validated in `__post_init__`.
Flags that need a package this machine lacks (`--deepspeed`, `--report_to wandb`, `--bits 4` without
bitsandbytes) fail here, before any model is built, naming what to install. Every mistake is a
`vlm.errors.ConfigError`, or `vlm.errors.MissingDependencyError` (also an ImportError) for a package.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from vlm.errors import ConfigError, MissingDependencyError, MissingPathError


# LoRA values used when a flag is not given (LLaVA's lora_r/lora_alpha, peft's usual dropout).
LORA_DEFAULTS = {"lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05}


def _alias(*names: str, help: str) -> dict:
    return {"aliases": list(names), "help": help}


def default_dataloader_workers() -> int:
    """`--dataloader_num_workers` when not given: min(4, the CPUs this process may use divided among the
    training processes of this node (torchrun's LOCAL_WORLD_SIZE)), at least 1, so that images are decoded and
    preprocessed beside the training step instead of inside it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, cpus // processes))


@dataclass(frozen=True)
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata=_alias(
        "--base_language_model",
        help="the decoder LLM (hub id or folder), or a vlm / LLaVA model folder to continue from"))
    vision_tower: str | None = field(default=None, metadata=_alias(
        "--base_value_model", help="CLIP or SigLIP vision model (hub id or folder); continuing from a model folder: "
                                   "that folder's tower"))
    mm_projector_type: str | None = field(default=None, metadata={
        "help": "linear | mlp<N>x_gelu | identity | pixel_shuffle2_mlp2x_gelu (4x fewer image tokens); default "
                "mlp2x_gelu, or the folder's own"})
    mm_vision_select_layer: int | None = field(default=None, metadata={
        "help": "hidden_states index of the vision tower (default -2; a model folder to continue from keeps its own: "
                "another value is an error)"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch | cls_patch"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={
        "help": "stage-1 projector weights (mm_projector.safetensors or its folder)"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={
        "help": "stage 1 (pretrain): train only the projector"})
    unfreeze_vision_tower: bool = field(default=False, metadata={"help": "train the vision tower too"})
    freeze_backbone: bool = field(default=False, metadata={"help": "keep the LLM frozen in stage 2"})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "LLaVA flag; only False (LLaVA-1.5's) is supported"})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "LLaVA flag; only False (LLaVA-1.5's) is supported"})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa | eager | flash_attention_2 | torch_varlen (packed rows with PyTorch's varlen flash kernel, CUDA)"})
    model_weights: str | None = field(default=None, metadata={
        "help": "Basic-VLM: a vlm model folder whose weights initialise the run"})
    trust_remote_code: bool = field(default=False, metadata={"help": "passed to transformers loaders"})


@dataclass(frozen=True)
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "data file(s), comma-separated, or a YAML mix file"})
    image_folder: str | None = field(default=None, metadata={"help": "image folder(s), comma-separated"})
    data_format: str = field(default="auto", metadata={"help": "reader: auto | llava | xtuner | coco | ..."})
    image_map: str | None = field(default=None, metadata={"help": "Basic-VLM image_map.json"})
    captions_file: str | None = field(default=None, metadata={"help": "Basic-VLM captions.json"})
    version: str | None = field(default=None, metadata={"help": (
        "chat template (LLaVA's --version): plain | v1 (vicuna_v1) | llava_v1 | chatml | llama3 | tokenizer (the "
        "LLM's own). Default: the start folder's; plain in stage 1; 'tokenizer' when the LLM has one; else v1. "
        "chatml's system prompt: the tokenizer's (Qwen2.5's 'You are Qwen, ...'), else Qwen2's; llama3: the "
        "Llama-3.0 format ('tokenizer' for Llama-3.1's date block)")})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad | resize | crop"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "LLaVA flag; only True: data is always read lazily"})
    is_multimodal: bool = field(default=True, metadata={"help": "LLaVA flag; only True: the model always has images"})
    truncate: str = field(default="none", metadata={"help": "too-long samples: none (drop) | turns"})
    max_drop_ratio: float = field(default=0.01, metadata={"help": "stop when more samples than this would be dropped"})
    check_images: str = field(default="exists", metadata={"help": "validation: full | exists | none"})
    allow_absolute_image_paths: bool = field(default=False, metadata={
        "help": "accept absolute image paths (each must resolve to a regular file)"})
    escape_special_tokens: bool = field(default=False, metadata={
        "help": "tokenise <|im_end|>, </s>... in the data as text, not control tokens"})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "read and checked like --data_path; eval_loss every --eval_steps N"})
    eval_image_folder: str | None = field(default=None, metadata={
        "help": "image folder(s) of the eval data (default: --image_folder)"})
    eval_references_field: str | None = field(default=None, metadata={
        "help": "the records' field of reference answers (default: the final reply)"})


@dataclass
class VLMTrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "longest tokenised sample"})
    mm_projector_lr: float | None = field(default=None, metadata=_alias(
        "--feature_proj_lr", help="projector learning rate (default: --learning_rate)"))
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "vision tower learning rate"})
    group_by_modality_length: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "image and text-only samples in separate batches, similar lengths together (default: on when the "
                "data mixes both, else off)"})
    packing: bool = field(default=False, metadata=_alias(
        "--padding_free", help="pack samples into rows, no padding"))
    supervised_only_loss: bool = field(default=True, metadata={
        "help": "LM head only at labelled tokens: same loss, faster"})
    method: str = field(default="sft", metadata={
        "help": "sft | dpo (preference pairs: prompt, chosen, rejected)"})
    beta: float = field(default=0.1, metadata={"help": "dpo: β, how far the policy may move from the reference"})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "dpo: sigmoid | ipo | robust (TRL's losses); orpo | simpo (no reference model)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "dpo: ε in [0, 0.5): cDPO (sigmoid), rDPO (robust)"})
    rpo_alpha: float | None = field(default=None, metadata={
        "help": "dpo: weight of the chosen answers' NLL in the loss (RPO)"})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "dpo: reference log-probs computed once, kept in --output_dir"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "--loss_type simpo: the target reward margin γ"})
    lora_enable: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True,  # a bare --lora_enable is True, as for the plain bool flags
        "help": "train the LLM with LoRA (default: True when a LoRA flag below is given, as Basic-VLM's train.sh "
                "expects, else False)"})
    lora_r: int | None = field(default=None, metadata=_alias("--lora_rank", help=f"LoRA rank (default {LORA_DEFAULTS['lora_r']})"))
    lora_alpha: int | None = field(default=None, metadata={"help": f"LoRA alpha (default {LORA_DEFAULTS['lora_alpha']})"})
    lora_dropout: float | None = field(default=None, metadata={
        "help": f"LoRA dropout (default {LORA_DEFAULTS['lora_dropout']})"})
    lora_weight_path: str = field(default="", metadata={
        "help": "a PEFT adapter folder (e.g. a vlm LoRA run) that initialises this run's LoRA; same --lora_r, "
                "--target_modules and --lora_bias"})
    lora_bias: str = field(default="none", metadata={
        "help": "PEFT's LoRA bias: none | all | lora_only (the adapted layers' biases); trained biases are saved "
                "in the adapter"})
    target_modules: str | None = field(default=None, metadata={
        "help": "LoRA targets: regex ('c_attn|w1|w2') or comma list; default every linear layer of the LLM"})
    bits: int = field(default=16, metadata={
        "help": "16 (none), or 4 / 8: QLoRA, the LLM quantised by bitsandbytes on CUDA or CPU (needs --lora_enable, "
                "pip install 'vlm-kit[qlora]')"})
    double_quant: bool = field(default=True, metadata={"help": "--bits 4: quantise the quantisation constants too"})
    quant_type: str = field(default="nf4", metadata={"help": "--bits 4: data type nf4 | fp4 (bnb_4bit_quant_type)"})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "keep the projector frozen"})
    eval_generation_samples: int = field(default=0, metadata={
        "help": "greedy answers to the first N eval samples, scored: eval_<metric>"})
    eval_metric: str = field(default="exact", metadata={
        "help": "their score: exact | vqa | chartqa | choice"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of --eval_strategy"})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "old name: warmup as a fraction of the steps (transformers 5 takes a float --warmup_steps)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start over: remove --output_dir's checkpoints instead of resuming"})
    cache_dir: str | None = field(default=None, metadata={"help": (
        "hub cache for every hub read of the run (default: HF_HUB_CACHE)")})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (TrainingArguments' names)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "must stay False for VLM batches"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "False is safe: frozen parts never require grad"})
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "image-decoding processes; default min(4, CPUs per process), 0: none"})

    def __post_init__(self):
        self._resolve_lora()
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.eval_steps is not None and _strategy_name(self.eval_strategy) == "no":
            self.eval_strategy = "steps"  # --eval_steps N means evaluating every N steps (vlm.train.evaluation)
        if self.load_best_model_at_end and _strategy_name(self.eval_strategy) == "no":
            raise ConfigError("--load_best_model_at_end needs evaluations to compare: add --eval_data_path FILE and "
                              "--eval_steps N (N dividing --save_steps), or drop the flag")
        self._check_eval_generation()
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ConfigError(f"--warmup_ratio {self.warmup_ratio}: expected a fraction in [0, 1)")
            self.warmup_steps = self.warmup_ratio
        self._check_optional_packages()
        self._check_method()
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = default_dataloader_workers()
        if self.tf32 and not torch.cuda.is_available():
            print("note: --tf32 needs a CUDA GPU; ignored on this machine", flush=True)
            self.tf32 = None
        if (self.bf16 or self.fp16) and not torch.cuda.is_available():
            self.use_cpu = True
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen embeddings (LoRA, stage 1) without input hacks.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        try:
            super().__post_init__()
        except ValueError as exc:  # transformers' checks of its own flags (e.g. --save_steps not a multiple of
            raise ConfigError(" ".join(str(exc).split())) from None  # --eval_steps): a user mistake, one line

    def _check_eval_generation(self) -> None:
        from vlm.train.evaluation import EVAL_METRICS

        if self.eval_generation_samples < 0:
            raise ConfigError(f"--eval_generation_samples {self.eval_generation_samples}: expected N >= 0 (0: off)")
        if self.eval_metric not in EVAL_METRICS:
            raise ConfigError(f"--eval_metric {self.eval_metric!r}: expected one of {', '.join(EVAL_METRICS)}")

    def _resolve_lora(self) -> None:
        """LoRA flags without `--lora_enable` mean LoRA (Basic-VLM's train.sh never passes it); with
        `--lora_enable False` they are an error. Unset LoRA values then take their defaults."""
        spelled = {"lora_r": "--lora_r/--lora_rank"}
        given = [spelled.get(name, f"--{name}") for name in (*LORA_DEFAULTS, "target_modules")
                 if getattr(self, name) is not None]
        if self.lora_enable is None:
            self.lora_enable = bool(given)
            if given:
                print(f"note: {', '.join(given)} without --lora_enable: training with LoRA (pass --lora_enable "
                      "True to say so, or drop the LoRA flags to train every weight)", flush=True)
        elif not self.lora_enable and given:
            raise ConfigError(f"--lora_enable False contradicts {', '.join(given)}: drop the LoRA flags to train every "
                             "weight, or drop --lora_enable False to train with LoRA")
        for name, default in LORA_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)

    def _check_method(self) -> None:
        """`--method` and the DPO flags (TRL's names and ranges); a DPO flag with `--method sft` would do nothing."""
        from vlm.train.dpo import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, SMOOTHED_LOSS_TYPES

        if self.method not in ("sft", "dpo"):
            raise ConfigError(f"--method {self.method!r}: expected sft or dpo")
        defaults = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": None,
                    "precompute_ref_log_probs": False, "simpo_gamma": 0.5}
        if self.method == "sft":
            given = [f"--{k}" for k, v in defaults.items() if getattr(self, k) != v]
            if given:
                raise ConfigError(f"{', '.join(given)} set preference training: add --method dpo, or drop them")
            return
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss_type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ConfigError(f"--beta {self.beta}: expected a positive number (TRL's default 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label_smoothing {self.label_smoothing}: expected a probability in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSS_TYPES:
            raise ConfigError(f"--label_smoothing applies to --loss_type {' or '.join(SMOOTHED_LOSS_TYPES)}, not "
                              f"{self.loss_type}: drop it")
        if self.simpo_gamma != 0.5 and self.loss_type != "simpo":
            raise ConfigError(f"--simpo_gamma applies to --loss_type simpo, not {self.loss_type}: drop it")
        if self.precompute_ref_log_probs and self.loss_type in REFERENCE_FREE_LOSS_TYPES:
            raise ConfigError(f"--loss_type {self.loss_type} uses no reference model: drop --precompute_ref_log_probs")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ConfigError(f"--rpo_alpha {self.rpo_alpha}: expected a weight >= 0")
        if self.deepspeed:
            raise ConfigError("--deepspeed is not supported with --method dpo yet (the reference model is not "
                              "sharded): train with DDP (torchrun / train.sh) instead")

    def _check_optional_packages(self) -> None:
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise MissingDependencyError(f"--deepspeed {self.deepspeed} needs DeepSpeed: install the GPU extra "
                              "`pip install 'vlm-kit[gpu]'` (or `pip install deepspeed`), or drop the flag")
        reports = self.report_to if isinstance(self.report_to, list) else [self.report_to]
        for name in reports:
            if name in (None, "none", "all"):
                continue
            module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name, name)
            if importlib.util.find_spec(module) is None:
                raise MissingDependencyError(f"--report_to {name} needs the {module!r} package: `pip install {module}`, "
                                  "or use --report_to none")
        self._check_lora_and_quantization()

    def _check_lora_and_quantization(self) -> None:
        from vlm.folders.lora import LORA_BIAS
        from vlm.quantization import QUANT_TYPES, require_bitsandbytes

        if self.lora_bias not in LORA_BIAS:
            raise ConfigError(f"--lora_bias {self.lora_bias!r}: expected one of {', '.join(LORA_BIAS)} (PEFT's bias)")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"--quant_type {self.quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        if self.lora_weight_path and not self.lora_enable:
            raise ConfigError(f"--lora_weight_path {self.lora_weight_path!r} initialises a LoRA adapter: add "
                             "--lora_enable True, or drop the flag")
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"--bits {self.bits}: expected 4, 8 (QLoRA) or 16")
        if self.bits in (4, 8):
            try:
                require_bitsandbytes(f"--bits {self.bits} (QLoRA)")
            except ImportError as exc:
                raise MissingDependencyError(str(exc)) from None
            if not self.lora_enable:
                raise ConfigError(f"--bits {self.bits} quantises the LLM, whose own weights then cannot be trained or "
                                 "saved: add --lora_enable True (QLoRA), or drop --bits")


def _strategy_name(value) -> str:
    return getattr(value, "value", value)  # an IntervalStrategy or its string


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, VLMTrainingArguments]:
    """Parse flags (and `--config FILE`, whose values flags override). `-h/--help` prints the grouped help of
    `vlm.train.help`, `--help-all` the parser's full list (both exit 0, as argparse's help does)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, VLMTrainingArguments))
    argv = list(argv)
    if "--help-all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        import shutil

        from vlm.train.help import help_text

        print(help_text((ModelArguments, DataArguments, VLMTrainingArguments),
                        width=min(100, max(80, shutil.get_terminal_size((100, 24)).columns))), end="")
        raise SystemExit(0)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        path = argv[i + 1]
        del argv[i:i + 2]
        parser.set_defaults(**_read_config_file(path))
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unknown flag(s): {' '.join(rest)} (see `python train.py --help`)")
    check_fixed_values(model_args, data_args)
    return model_args, data_args, training_args


def check_fixed_values(*sections) -> None:
    """LLaVA flags taken only at one value (`FIXED_VALUES`): any other value is a ConfigError."""
    for args in sections:
        for name, (value, why) in FIXED_VALUES.items():
            if hasattr(args, name) and getattr(args, name) != value:
                raise ConfigError(f"--{name} {getattr(args, name)} is not supported: {why}; drop the flag")


# LLaVA flags that vlm takes only at one value (the one LLaVA-1.5's scripts use), and why: a flag that parsed
# and then did nothing would silently train something else than asked.
FIXED_VALUES: dict[str, tuple[bool, str]] = {
    "mm_use_im_start_end": (False, "LLaVA-1.5 trains without image start/end tokens, and so does vlm"),
    "mm_use_im_patch_token": (False, "LLaVA-1.5 trains without image patch tokens, and so does vlm"),
    "is_multimodal": (True, "vlm always builds a vision-language model (LLaVA sets it True itself whenever there "
                            "is a vision tower); text-only samples are mixed in by giving them no image"),
    "lazy_preprocess": (True, "vlm always reads samples lazily: every sample is validated once before training "
                              "and tokenised when its batch is built"),
}


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise MissingPathError(f"--config file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f) or {}
        else:
            data = json.load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of flag names to values")
    return data


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
        if "output_dir" in _read_config_file(argv[argv.index("--config") + 1]):
            return
    raise ConfigError("no --output_dir: name the folder for this run's checkpoints, model and data report "
                      "(e.g. --output_dir runs/my-run); `python train.py` with no flags runs the demo")
