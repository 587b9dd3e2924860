"""Composing a VLM: vision tower + projector + LLM subclass, and loading/saving model folders.

    model = vlm.build_model(VLMConfig(vision=VisionConfig("openai/clip-vit-large-patch14-336"),
                                      llm=LLMConfig("Qwen/Qwen2.5-0.5B-Instruct")), tokenizer=tok)
    model.save_pretrained("out"); model = vlm.from_pretrained("out")

Saving and loading model folders is `vlm.folders` (`vlm.from_pretrained` is `vlm.folders.build.from_pretrained`).
The LLM class comes from the decoder config's `model_type` (`vlm.llm.LLM_CLASSES`); the tower from
the vision config's `model_type` (`vlm.visual.tower.VISION_TOWERS`). The vision tower and projector
are cast to the LLM's dtype.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from vlm.config import ATTN_IMPLEMENTATIONS, VLMConfig
from vlm.errors import ConfigError, MissingDependencyError
from vlm.hub import pretrained_config
from vlm.llm import varlen
from vlm.llm.models import llm_class_for
from vlm.projector import build_projector, projected_num_tokens
from vlm.visual.tower import VisionTower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype) -> str:
    """'bf16' / torch.bfloat16 -> 'bfloat16' (the spelling config.json uses)."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def check_attn_implementation(name: str) -> str:
    """Validate the attention backend (flash-attn is an optional GPU extra); `torch_varlen`, ours, is registered with
    transformers here, before any model is built with it."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise MissingDependencyError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed; "
            "install the GPU extra with `pip install 'vlm-kit[gpu]'` (CUDA only) or use 'sdpa'"
        )
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation={name!r}; expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == varlen.NAME:
        varlen.register()
    return name


def text_config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("llm.hf_config has no 'model_type'; it must be a transformers decoder config dict")
    return AutoConfig.for_model(model_type, **data)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return None


def check_llm_fits_memory(hf_config: dict[str, Any], dtype: torch.dtype | None, source: str = "llm.hf_config") -> None:
    """ConfigError before allocating when the decoder's weights alone (embeddings + layers, estimated from the
    config's sizes) exceed this machine's memory: a one-line answer instead of an allocation failure or the
    OOM killer. A rough lower bound; a model that passes may still not fit with activations."""
    sizes = [hf_config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")]
    memory = _physical_memory()
    if memory is None or not all(isinstance(v, int) for v in sizes):
        return
    vocab, hidden, inter, layers = sizes
    tied = hf_config.get("tie_word_embeddings", True)
    params = vocab * hidden * (1 if tied else 2) + layers * (4 * hidden * hidden + 3 * hidden * inter)
    needed = params * torch.tensor([], dtype=dtype or torch.float32).element_size()
    if needed > memory:
        raise ConfigError(
            f"{source}: vocab_size={vocab:,}, hidden_size={hidden:,}, intermediate_size={inter:,}, "
            f"num_hidden_layers={layers} need about {needed / 1e9:,.1f} GB for the weights alone, more than this "
            f"machine's {memory / 1e9:,.1f} GB; check the config's sizes"
        )


def _build_llm(config: VLMConfig, *, load_weights: bool, dtype: torch.dtype | None, attn: str,
               cache_dir: str | None = None):
    if config.llm.hf_config is not None and not (load_weights and config.llm.name_or_path):
        check_llm_fits_memory(config.llm.hf_config, dtype)
        hf_config = text_config_from_dict(config.llm.hf_config)
        hf_config._attn_implementation = attn
        model = llm_class_for(hf_config.model_type)(hf_config)
        return model.to(dtype) if dtype is not None else model
    model_type = pretrained_config(config.llm.name_or_path, what="LLM", cache_dir=cache_dir).model_type
    return llm_class_for(model_type).from_pretrained(config.llm.name_or_path, dtype=dtype, attn_implementation=attn,
                                                     cache_dir=cache_dir)


def build_model(config: VLMConfig, *, tokenizer=None, load_weights: bool = True,
                dtype: str | torch.dtype | None = None, attn_implementation: str | None = None,
                cache_dir: str | None = None):
    """Build a VLM from its config: pretrained components where `name_or_path` is set, random weights otherwise.

    Args:
        config: the model config (read-only). The model carries the completed copy as `model.vlm_config`:
            derived fields (projector dims, `num_image_tokens`, the sub-models' `hf_config`,
            `image_token_id` from the tokenizer) filled in, `dtype`/`attn_implementation` overridden.
        tokenizer: when given, `<image>` is added to it if missing and the LLM's embeddings are resized.
        load_weights: False builds the architecture only (weights come from a saved folder).
        dtype: overrides `config.dtype` ("float32", "bfloat16", "float16").
        attn_implementation: overrides `config.attn_implementation`.
        cache_dir: the Hugging Face hub cache the pretrained LLM and tower are read from (`--cache_dir`);
            None: the default cache. A property of this machine, not of the model: not written to the config.
    """
    from vlm.folders.weights import save_model

    overrides = {}
    if dtype is not None:
        overrides["dtype"] = dtype_name(dtype)
    if attn_implementation is not None:
        overrides["attn_implementation"] = attn_implementation
    config = config.replace(**overrides) if overrides else config
    attn = check_attn_implementation(config.attn_implementation)
    torch_dtype = resolve_dtype(config.dtype)

    llm = _build_llm(config, load_weights=load_weights, dtype=torch_dtype, attn=attn, cache_dir=cache_dir)
    image_token_id = config.image_token_id
    if tokenizer is not None:
        from vlm.data.tokenizer import ensure_image_token

        image_token_id = ensure_image_token(tokenizer)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
    if image_token_id is None:
        raise ConfigError("image_token_id is not set: pass the tokenizer to build_model or set config.image_token_id")
    vocab = llm.get_input_embeddings().num_embeddings
    if not 0 <= image_token_id < vocab:
        raise ConfigError(f"image_token_id={image_token_id} is outside the LLM's vocabulary of {vocab} embeddings")

    tower = VisionTower.from_config(config.vision, attn_implementation=attn, dtype=torch_dtype,
                                    load_weights=load_weights, cache_dir=cache_dir)
    config = config.replace(  # validated again, the projector's dimensions included
        image_token_id=image_token_id,
        num_image_tokens=projected_num_tokens(config.projector, tower.num_image_tokens),  # merges: fewer
        projector=dataclasses.replace(config.projector, input_dim=tower.hidden_size, output_dim=llm.config.hidden_size),
        vision=dataclasses.replace(config.vision, hf_config=tower.model.config.to_dict()),
        llm=dataclasses.replace(config.llm, hf_config=llm.config.to_dict()),
    )
    projector = build_projector(config.projector)
    if torch_dtype is not None:
        projector = projector.to(torch_dtype)
    llm.attach_vision(tower, projector, config, save_folder=save_model)
    return llm

