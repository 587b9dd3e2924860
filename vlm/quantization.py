"""8-/4-bit LLMs with bitsandbytes: QLoRA training (`--bits`) and quantised inference (`--load-4bit/--load-8bit`).

Design choices:
- One way to quantise, whatever the model came from (an LLM folder, a vlm folder, a LoRA run, LLaVA):
  the VLM is built in full precision first, then its LLM is re-instantiated through transformers'
  own loader, `LLMClass.from_pretrained(None, config=..., state_dict=<the LLM's weights>,
  quantization_config=BitsAndBytesConfig(...))`, as LLaVA loads its LLM for QLoRA. transformers
  then swaps the linear layers for `bitsandbytes` ones (lm_head and embeddings stay in full
  precision) and marks the model (`is_loaded_in_4bit`, `hf_quantizer`), which is what PEFT's
  `prepare_model_for_kbit_training` and its bnb LoRA layers look for. The vision tower and the
  projector are attached afterwards, so they are never quantised.
- bitsandbytes 0.50 has a CPU backend, so all of this also runs (slowly) without a GPU.
- A LoRA run trained on a quantised LLM records how (`quantization_config.json`); loading it
  quantised again reuses that recipe, which reproduces the training-time model exactly, because
  quantising the same full-precision weights is deterministic. Merging always happens on the
  full-precision base (`vlm.folders.lora.merge_lora_run`): adding LoRA deltas to 4-bit weights is lossy.

Reference: LLaVA's `train.py` (`BitsAndBytesConfig(load_in_4bit=..., bnb_4bit_compute_dtype=...,
bnb_4bit_use_double_quant=..., bnb_4bit_quant_type=...)`, then `prepare_model_for_kbit_training`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys

import torch
from torch import nn

from vlm.errors import ConfigError, MissingDependencyError

QUANT_TYPES = ("nf4", "fp4")
QUANTIZATION_RECORD = "quantization_config.json"
INSTALL_HINT = "pip install 'vlm-kit[qlora]'"
_NOT_LLM = ("vision_tower.", "mm_projector.")


def require_bitsandbytes(flag: str) -> None:
    """ImportError naming the extra to install when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(f"{flag} needs the bitsandbytes package: `{INSTALL_HINT}` (works on CPU and CUDA)")


def bnb_config(bits: int, *, quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype: torch.dtype = torch.float32):
    """The `transformers.BitsAndBytesConfig` for `bits` (4 or 8); `compute_dtype` is the 4-bit matmul dtype."""
    from transformers import BitsAndBytesConfig

    if bits not in (4, 8):
        raise ConfigError(f"bits={bits}: expected 4 or 8")
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r}: expected one of {QUANT_TYPES}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def config_bits(config) -> int:
    """4 or 8 for a `BitsAndBytesConfig`."""
    return 4 if config.load_in_4bit else 8


def quantize_llm(model: nn.Module, config, *, device: str | torch.device = "cpu",
                 prepare_for_training: bool = False) -> nn.Module:
    """A copy of the VLM `model` whose LLM is loaded through bitsandbytes; the tower and projector are reused as is.

    Args:
        model: a full-precision VLM (from `vlm.build_model`, `vlm.from_pretrained`, a merged LoRA run...).
        config: a `BitsAndBytesConfig` (see `bnb_config`).
        device: where the quantised LLM is placed (bitsandbytes quantises when weights reach it).
        prepare_for_training: run PEFT's `prepare_model_for_kbit_training` on the LLM (freeze it, cast its
            remaining 16-bit parameters to fp32) before the tower and projector are attached, as LLaVA does.

    Returns:
        The new VLM (same class); `model` itself should no longer be used.
    """
    require_bitsandbytes(f"{config_bits(config)}-bit loading")
    if getattr(model, "vlm_config", None) is None:
        raise TypeError(f"quantize_llm expects a VLM built by vlm.build_model, got {type(model).__name__}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ConfigError("the model's LLM is already quantised")
    llm_state = {k: v for k, v in model.state_dict().items() if not k.startswith(_NOT_LLM)}  # (full precision)
    hf_config = model.config.__class__.from_dict(model.config.to_dict())
    quantized = type(model).from_pretrained(
        None, config=hf_config, state_dict=llm_state, quantization_config=config, dtype=model.dtype,
        device_map={"": str(device)}, attn_implementation=model.config._attn_implementation)
    if prepare_for_training:
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing is the Trainer's to switch on (--gradient_checkpointing).
        quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    quantized.attach_vision(model.vision_tower.to(device), model.mm_projector.to(device), model.vlm_config,
                            save_folder=model._save_folder)
    quantized.generation_config = model.generation_config
    return quantized


def quantized_llm_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The LLM's bitsandbytes linear layers by name (through PEFT wrappers too)."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def llm_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the LLM's weights: parameters and buffers outside the tower/projector, plus 4-bit quant states.

    4-bit weights are packed two per byte (uint8) and carry a `quant_state` (absmax per block, the code
    book, and with double quantisation the nested statistics), which is not a parameter or buffer.
    """
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None or id(tensor) in seen:
            return
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()

    for prefix_source in (model.named_parameters(remove_duplicate=True), model.named_buffers()):
        for name, tensor in prefix_source:
            if "vision_tower." in name or "mm_projector." in name or "lora_" in name:
                continue
            add(tensor)
            state = getattr(tensor, "quant_state", None)
            while state is not None:
                add(state.absmax)
                add(state.code)
                add(getattr(state, "offset", None))
                state = getattr(state, "state2", None)
    return total


def save_quantization_record(folder: str | os.PathLike, config) -> None:
    """Write how the run's LLM was quantised (a `BitsAndBytesConfig` as JSON)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    with open(os.path.join(folder, QUANTIZATION_RECORD), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)


def load_quantization_record(folder: str | os.PathLike, bits: int, compute_dtype: torch.dtype):
    """The recorded `BitsAndBytesConfig` when the run was trained at `bits`, else LLaVA's defaults for `bits`.

    The compute dtype is always the one asked for now (it is a runtime choice, not part of the weights).
    """
    path = os.path.join(folder, QUANTIZATION_RECORD)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("load_in_4bit") and bits == 4:
            return bnb_config(4, quant_type=data.get("bnb_4bit_quant_type", "nf4"),
                              double_quant=bool(data.get("bnb_4bit_use_double_quant", True)),
                              compute_dtype=compute_dtype)
        if data.get("load_in_8bit") and bits == 8:
            return bnb_config(8)
    return bnb_config(bits, compute_dtype=compute_dtype)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode inside the block (no dropout: a DPO reference or an evaluation is deterministic).

    bitsandbytes' 4-bit layers stay in train mode: on a CPU with AVX512-BF16, bitsandbytes 0.50's `Linear4bit`
    repacks its weight in place, for good, on its first no-grad forward in eval mode, into a layout only its
    inference kernel reads, and the policy's next training forward then fails ("a view of a leaf Variable that
    requires grad is being used in an in-place operation"). The flag changes nothing else in that layer (it has no
    dropout): the reference runs the same kernel as the policy (tests/test_dpo_qlora.py); the Trainer's evaluation
    runs in it too (tests/test_eval_during_training.py)."""
    was_training = model.training
    model.eval()
    for module in _quantized_4bit_layers(model):
        module.train()
    try:
        yield model
    finally:
        model.train(was_training)


def _quantized_4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if "bitsandbytes" not in sys.modules:  # not imported: the model holds none
        return []
    linear4bit = sys.modules["bitsandbytes"].nn.Linear4bit
    return [m for m in model.modules() if isinstance(m, linear4bit)]
