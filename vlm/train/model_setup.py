"""The model a run starts from, and which of its parameters train.

Starting points (`--model_name_or_path`):
- a vlm model folder (a stage-1 output or any saved vlm model): loaded whole;
- an original LLaVA or llava-hf folder, or a vlm LoRA run (merged): loaded by
  `vlm.folders.load.load_pretrained_model`;
- otherwise a decoder LLM (hub id or folder), composed with `--vision_tower` and a new projector.
A Hub id is recognised by its files (`vlm.folders.kinds.model_kind`), like a folder. Every Hub read (the start point,
the LLM, its tokenizer, the vision tower and its image processor, a LoRA run's base) goes through `--cache_dir`
when it is given, as LLaVA's `cache_dir=training_args.cache_dir`; the saved model never records it (it is
a property of this machine). Starting from a model folder,
`--vision_tower`, `--mm_projector_type` and `--mm_vision_select_layer` must agree with it (an error names both
values otherwise), and a LoRA run records that folder as its base (`adapter_config.json`), so `vlm merge-lora`
and `load_pretrained_model(run)` rebuild the weights the adapters were trained on.
`--pretrain_mm_mlp_adapter` then loads stage-1 projector weights; `--model_weights` (Basic-VLM) loads
a whole vlm folder's weights into the composed model.

Stages: `--tune_mm_mlp_adapter True` is stage 1 (projector only). Otherwise stage 2: projector plus
the LLM (full weights, or LoRA with `--lora_enable`), the vision tower with `--unfreeze_vision_tower`.
With `--bits 4|8` (QLoRA) the LLM is re-loaded through bitsandbytes before LoRA goes on (`vlm.quantization`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from vlm.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlm.errors import ConfigError, MissingPathError
from vlm.folders.weights import load_state_dict, load_state_dict_strict, read_pickled_weights, read_safetensors
from vlm.model import build_model
from vlm.visual.processor import ASPECT_RATIOS, ImageProcessor


def _start_kind(path: str | None, cache_dir: str | None = None) -> tuple[str, str | None]:
    """(kind, local folder) of the start point (`vlm.folders.kinds.model_kind`: a Hub id is read from its config;
    a path that is not there is a MissingPathError), or ('llm', path) for a plain decoder (folder or hub id)."""
    from vlm.folders.kinds import model_kind

    return model_kind(path, cache_dir=cache_dir) if path else ("llm", path)


def check_start_flags(model_args, model, start: str, *, cache_dir: str | None = None) -> None:
    """Flags that describe the model must agree with the folder training continues from: one ConfigError
    naming every flag, its value and the folder's."""
    config = model.vlm_config
    conflicts = []
    if model_args.mm_projector_type is not None and model_args.mm_projector_type != config.projector.type:
        conflicts.append(f"--mm_projector_type {model_args.mm_projector_type!r} (the folder's: {config.projector.type!r})")
    if model_args.mm_vision_select_layer is not None and model_args.mm_vision_select_layer != config.vision.select_layer:
        conflicts.append(f"--mm_vision_select_layer {model_args.mm_vision_select_layer} (the folder's: "
                         f"{config.vision.select_layer})")
    tower = model.vision_tower.model.config.to_dict()
    if model_args.vision_tower is not None and not _same_tower(model_args.vision_tower, config.vision.name_or_path,
                                                               tower, cache_dir=cache_dir):
        folder_tower = config.vision.name_or_path or (f"a {tower['model_type']} of hidden size {tower['hidden_size']}, "
                                                      f"{tower['num_hidden_layers']} layers")
        conflicts.append(f"--vision_tower {model_args.vision_tower!r} (the folder's: {folder_tower!r})")
    if conflicts:
        raise ConfigError(f"--model_name_or_path {start!r} is a model folder, and these flags contradict it: "
                          f"{'; '.join(conflicts)}. Drop them (the folder's are used), or start from the LLM")


_TOWER_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")


def _same_tower(flag: str, folder_name: str | None, folder_tower: dict, *, cache_dir: str | None = None) -> bool:
    """`--vision_tower` names the folder's tower: the same name, or a tower with the same architecture
    (e.g. a local copy of the hub tower the folder names); then the folder's trained tower weights are used."""
    from transformers import AutoConfig

    if flag == folder_name:
        return True
    try:  # only compared, never run: the folder's own code (auto_map) is not needed for that
        config = AutoConfig.from_pretrained(flag, cache_dir=cache_dir, trust_remote_code=False)
    except (OSError, ValueError):
        return False
    config = getattr(config, "vision_config", None) or config  # a full CLIP/SigLIP config holds the vision part
    ours = config.to_dict()
    if any(ours.get(key) != folder_tower.get(key) for key in _TOWER_FIELDS):
        return False
    print(f"note: --vision_tower {flag!r} has the architecture of the start folder's tower; the folder's tower "
          "weights are used", flush=True)
    return True


def with_aspect_ratio(image_processor: ImageProcessor, aspect_ratio: str) -> ImageProcessor:
    """The image processor with `--image_aspect_ratio`; ConfigError listing the choices for another value (LLaVA's
    `anyres` is LLaVA-NeXT's tiling, which vlm does not implement)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ConfigError(f"--image_aspect_ratio {aspect_ratio!r} is not supported; choose one of {', '.join(ASPECT_RATIOS)}")
    if image_processor.config.aspect_ratio == aspect_ratio:
        return image_processor
    return ImageProcessor(dataclasses.replace(image_processor.config, aspect_ratio=aspect_ratio))


def _run_dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def load_projector_weights(model, path: str) -> None:
    """Stage-1 projector weights: a file (safetensors, or LLaVA's mm_projector.bin) or a run folder."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("mm_projector.safetensors", "mm_projector.bin")]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(path):
        raise MissingPathError(f"--pretrain_mm_mlp_adapter: {path!r} not found")
    state = read_safetensors(path) if path.endswith(".safetensors") else read_pickled_weights(path)
    # Accept ours (mm_projector.0.weight), LLaVA's (model.mm_projector.0.weight) and bare (0.weight).
    state = {k.split("mm_projector.", 1)[-1]: v for k, v in state.items()}
    load_state_dict_strict(model.mm_projector, state, source=f"projector weights {path!r}")


def build_for_training(model_args, data_args, training_args):
    """Returns (model, tokenizer, image_processor), with trainable parameters set for the stage.

    A start folder, LLM folder or vision-tower folder whose configs declare their own code (`auto_map`) is refused
    unless `--trust_remote_code`; index files naming shards outside their folder are refused."""
    from vlm.folders.weights import check_weight_index
    from vlm.hub import auto_tokenizer, check_remote_code

    dtype, cache_dir, trust = _run_dtype(training_args), training_args.cache_dir, model_args.trust_remote_code
    for path in (model_args.model_name_or_path, model_args.vision_tower, model_args.model_weights):
        if path and os.path.isdir(path):
            check_remote_code(path, trust)
            check_weight_index(path)
    kind, folder = _start_kind(model_args.model_name_or_path, cache_dir)
    if kind != "llm":  # every model folder kind: the one loader (vlm.folders.load)
        from vlm.folders.load import load_pretrained_model

        tokenizer, model, image_processor, _ = load_pretrained_model(
            folder, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust,
            attn_implementation=model_args.attn_implementation)
    else:
        if not model_args.model_name_or_path or not model_args.vision_tower:
            raise ConfigError("a new model needs --model_name_or_path (the LLM) and --vision_tower "
                              "(run `python train.py` with no arguments for the embedded demo)")
        tokenizer = auto_tokenizer(model_args.model_name_or_path, trust_remote_code=trust, cache_dir=cache_dir)
        select_layer, projector = model_args.mm_vision_select_layer, model_args.mm_projector_type
        config = VLMConfig(
            vision=VisionConfig(name_or_path=model_args.vision_tower,
                                select_layer=VisionConfig.select_layer if select_layer is None else select_layer,
                                select_feature=model_args.mm_vision_select_feature),
            projector=ProjectorConfig(type=projector or ProjectorConfig.type),
            llm=LLMConfig(name_or_path=model_args.model_name_or_path),
            attn_implementation=model_args.attn_implementation,
        )
        model = build_model(config, tokenizer=tokenizer, dtype=dtype, cache_dir=cache_dir)
        image_processor = ImageProcessor.from_pretrained(model_args.vision_tower, cache_dir=cache_dir)
    if kind != "llm":
        check_start_flags(model_args, model, model_args.model_name_or_path, cache_dir=cache_dir)
    image_processor = with_aspect_ratio(image_processor, data_args.image_aspect_ratio)
    model.vlm_config = model.vlm_config.replace(image_aspect_ratio=data_args.image_aspect_ratio)  # saved in config.json
    tokenizer.model_max_length = training_args.model_max_length
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    if model_args.model_weights:
        from vlm.folders.weights import weights_file

        load_state_dict_strict(model, load_state_dict(model_args.model_weights),
                               source=f"--model_weights {weights_file(model_args.model_weights)}")
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_weights(model, model_args.pretrain_mm_mlp_adapter)
    if training_args.bits in (4, 8):
        model = quantize_for_training(model, training_args)
    # A LoRA run records the folder it starts from as its base (the LLM for a new model): merge-lora and
    # load_pretrained_model(run) rebuild exactly the weights the adapters were trained on.
    model = configure_trainable(model, model_args, training_args,
                                base=model_args.model_name_or_path if kind != "llm" else None)
    model.config.use_cache = False
    return model, tokenizer, image_processor


def quantize_for_training(model, training_args):
    """QLoRA (`--bits 4|8`): the LLM re-loaded through bitsandbytes and prepared for k-bit training.

    The compute dtype follows `--bf16/--fp16` (float32 otherwise); the tower and projector are untouched.
    """
    from vlm.quantization import bnb_config, quantize_llm

    config = bnb_config(training_args.bits, quant_type=training_args.quant_type,
                        double_quant=training_args.double_quant, compute_dtype=_run_dtype(training_args))
    return quantize_llm(model, config, device=training_args.device, prepare_for_training=True)


def configure_trainable(model, model_args, training_args, *, base: str | None = None):
    """Freeze/unfreeze per stage; wrap with LoRA when asked (`base`: what the LoRA run records as its base,
    see `vlm.folders.lora.apply_lora`). Returns the (possibly wrapped) model."""
    for p in model.parameters():
        p.requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:  # stage 1
        if training_args.lora_enable:
            raise ConfigError("--tune_mm_mlp_adapter (stage 1) trains the projector only; drop --lora_enable")
        model.mm_projector.requires_grad_(True)
        return model
    if training_args.lora_enable:
        from vlm.folders.lora import apply_lora, load_adapter_weights

        model = apply_lora(model, r=training_args.lora_r, alpha=training_args.lora_alpha,
                           dropout=training_args.lora_dropout, target_modules=training_args.target_modules,
                           bias=training_args.lora_bias, base=base)
        if training_args.lora_weight_path:
            load_adapter_weights(model, training_args.lora_weight_path)
        base = model.get_base_model()
    else:
        base = model
        if not model_args.freeze_backbone:
            base.model.requires_grad_(True)
            base.lm_head.requires_grad_(True)
    base.mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    base.vision_tower.set_trainable(model_args.unfreeze_vision_tower)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
