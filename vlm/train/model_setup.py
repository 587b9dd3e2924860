"""The model a run starts from, and which of its parameters train.

Starting points (`--model_name_or_path`):
- a vlm model folder (a stage-1 output or any saved vlm model): loaded whole;
- an original LLaVA or llava-hf folder, or a vlm LoRA run (merged): loaded by
  `vlm.builder.load_pretrained_model`;
- otherwise a decoder LLM (hub id or folder), composed with `--vision_tower` and a new projector.
`--pretrain_mm_mlp_adapter` then loads stage-1 projector weights; `--model_weights` (Basic-VLM) loads
a whole vlm folder's weights into the composed model.

Stages: `--tune_mm_mlp_adapter True` is stage 1 (projector only). Otherwise stage 2: projector plus
the LLM (full weights, or LoRA with `--lora_enable`), the vision tower with `--unfreeze_vision_tower`.
With `--bits 4|8` (QLoRA) the LLM is re-loaded through bitsandbytes before LoRA goes on (`vlm.quantization`).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from vlm.checkpoint import load_state_dict, load_state_dict_strict
from vlm.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlm.model import build_model, from_pretrained
from vlm.visual.processor import ImageProcessor


def _start_kind(path: str | None) -> str:
    """`vlm.builder.folder_kind` of a model folder, or 'llm' for a plain decoder (folder or hub id)."""
    from vlm.builder import folder_kind

    if not path or not os.path.isdir(path):
        return "llm"
    try:
        return folder_kind(path)
    except (ValueError, FileNotFoundError):  # a decoder LLM's own folder is none of the VLM kinds
        return "llm"


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
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter: {path!r} not found")
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept ours (mm_projector.0.weight), LLaVA's (model.mm_projector.0.weight) and bare (0.weight).
    state = {k.split("mm_projector.", 1)[-1]: v for k, v in state.items()}
    load_state_dict_strict(model.mm_projector, state, source=f"projector weights {path!r}")


def build_for_training(model_args, data_args, training_args):
    """Returns (model, tokenizer, image_processor), with trainable parameters set for the stage."""
    from transformers import AutoTokenizer

    dtype = _run_dtype(training_args)
    kind = _start_kind(model_args.model_name_or_path)
    if kind == "vlm":
        model = from_pretrained(model_args.model_name_or_path, dtype=dtype,
                                attn_implementation=model_args.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        image_processor = ImageProcessor.from_pretrained(model_args.model_name_or_path)
    elif kind in ("llava", "llava-hf", "lora"):
        from vlm.builder import load_pretrained_model

        tokenizer, model, image_processor, _ = load_pretrained_model(model_args.model_name_or_path, dtype=dtype)
    else:
        if not model_args.model_name_or_path or not model_args.vision_tower:
            raise ValueError("a new model needs --model_name_or_path (the LLM) and --vision_tower "
                             "(run `python train.py` with no arguments for the embedded demo)")
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                  trust_remote_code=model_args.trust_remote_code)
        config = VLMConfig(
            vision=VisionConfig(name_or_path=model_args.vision_tower, select_layer=model_args.mm_vision_select_layer,
                                select_feature=model_args.mm_vision_select_feature),
            projector=ProjectorConfig(type=model_args.mm_projector_type),
            llm=LLMConfig(name_or_path=model_args.model_name_or_path),
            attn_implementation=model_args.attn_implementation,
        )
        model = build_model(config, tokenizer=tokenizer, dtype=dtype)
        image_processor = ImageProcessor.from_pretrained(model_args.vision_tower)
    image_processor.config.aspect_ratio = data_args.image_aspect_ratio
    tokenizer.model_max_length = training_args.model_max_length
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    if model_args.model_weights:
        load_state_dict_strict(model, load_state_dict(model_args.model_weights),
                               source=f"--model_weights {model_args.model_weights!r}")
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_weights(model, model_args.pretrain_mm_mlp_adapter)
    if training_args.bits in (4, 8):
        model = quantize_for_training(model, training_args)
    model = configure_trainable(model, model_args, training_args)
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


def configure_trainable(model, model_args, training_args):
    """Freeze/unfreeze per stage; wrap with LoRA when asked. Returns the (possibly wrapped) model."""
    for p in model.parameters():
        p.requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:  # stage 1
        if training_args.lora_enable:
            raise ValueError("--tune_mm_mlp_adapter (stage 1) trains the projector only; drop --lora_enable")
        model.mm_projector.requires_grad_(True)
        return model
    if training_args.lora_enable:
        from vlm.lora import apply_lora, load_adapter_weights

        model = apply_lora(model, r=training_args.lora_r, alpha=training_args.lora_alpha,
                           dropout=training_args.lora_dropout, target_modules=training_args.target_modules,
                           bias=training_args.lora_bias)
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
