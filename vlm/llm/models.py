"""The VLM language-model classes: one subclass per supported `transformers` decoder, keyed by `model_type`.

Qwen2.5 uses Qwen2's `model_type` ("qwen2"); Vicuna and LLaMA-2/3 use "llama"; Mistral-style models
"mistral". Adding a family is one line here if its causal-LM class has the standard forward.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from vlm.llm.mixin import VLMMixin


class VLMQwen2ForCausalLM(VLMMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 with image splicing."""


class VLMQwen3ForCausalLM(VLMMixin, Qwen3ForCausalLM):
    """Qwen3 with image splicing."""


class VLMLlamaForCausalLM(VLMMixin, LlamaForCausalLM):
    """LLaMA-2/3, Vicuna with image splicing."""


class VLMMistralForCausalLM(VLMMixin, MistralForCausalLM):
    """Mistral-style decoders with image splicing."""


LLM_CLASSES: dict[str, type] = {
    "qwen2": VLMQwen2ForCausalLM,
    "qwen3": VLMQwen3ForCausalLM,
    "llama": VLMLlamaForCausalLM,
    "mistral": VLMMistralForCausalLM,
}


def llm_class_for(model_type: str) -> type:
    """The VLM class for a decoder config's `model_type`."""
    if model_type not in LLM_CLASSES:
        raise ValueError(f"LLM of type {model_type!r} is not supported; supported: {sorted(LLM_CLASSES)}")
    return LLM_CLASSES[model_type]
