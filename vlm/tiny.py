"""Tiny component configs for tests, examples and the demo: real architectures, random weights, no hub.

Sizes follow transformers' own LLaVA tests (hidden 32-128, 2 layers, 8x8 patches), small enough that a
forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig

from vlm.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlm.errors import ConfigError


def tiny_vision_config(kind: str = "siglip", *, hidden_size: int = 32, image_size: int = 32, patch_size: int = 8,
                       num_layers: int = 2, num_heads: int = 4):
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size)
    if kind == "clip":
        return CLIPVisionConfig(**common, projection_dim=hidden_size)
    if kind == "siglip":
        return SiglipVisionConfig(**common, vision_use_head=False)
    raise ConfigError(f"kind={kind!r}; expected 'clip' or 'siglip'")


def tiny_llm_config(kind: str = "qwen2", *, vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, tie_word_embeddings: bool = True):
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings)
    classes = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "mistral": MistralConfig}
    if kind not in classes:
        raise ConfigError(f"kind={kind!r}; expected one of {sorted(classes)}")
    extra = {"head_dim": hidden_size // num_heads} if kind == "qwen3" else {}
    return classes[kind](**common, **extra)


def tiny_vlm_config(vision: str = "siglip", llm: str = "qwen2", *, projector: str = "mlp2x_gelu",
                    image_token_id: int = 5, select_layer: int = -2, select_feature: str = "patch",
                    vocab_size: int = 256, **vision_kwargs) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(hf_config=tiny_vision_config(vision, **vision_kwargs).to_dict(), select_layer=select_layer,
                            select_feature=select_feature),
        projector=ProjectorConfig(type=projector),
        llm=LLMConfig(hf_config=tiny_llm_config(llm, vocab_size=vocab_size).to_dict()),
        image_token_id=image_token_id,
    )


def save_tiny_components(folder, texts: list[str] | None = None, *, llm: str = "qwen2", vision: str = "siglip",
                         image_size: int = 32, seed: int = 0) -> tuple[str, str]:
    """Write a tiny LLM folder (weights + tokenizer) and a tiny vision folder (weights + image processor).

    They stand in for hub checkpoints (`--model_name_or_path`, `--vision_tower`) in tests. Returns
    (llm_folder, vision_folder).
    """
    import os

    import torch
    from transformers import AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

    from vlm.data.tokenizer import build_tokenizer
    from vlm.visual.processor import ImageProcessor

    texts = texts or ["What color is the circle? red green blue yellow square triangle circle yes no 1 2 3"]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(seed)
    llm_folder, vision_folder = os.path.join(folder, "llm"), os.path.join(folder, "vision")
    llm_model = AutoModelForCausalLM.from_config(tiny_llm_config(llm, vocab_size=len(tokenizer)))
    llm_model.save_pretrained(llm_folder)
    tokenizer.save_pretrained(llm_folder)
    vision_config = tiny_vision_config(vision, image_size=image_size)
    vision_model = (CLIPVisionModel if vision == "clip" else SiglipVisionModel)(vision_config)
    vision_model.save_pretrained(vision_folder)
    ImageProcessor.from_vision_config(vision_config, aspect_ratio="resize").save_pretrained(vision_folder)
    return llm_folder, vision_folder
