"""vlm: build, train and run LLaVA-style vision-language models.

    import vlm
    model = vlm.build_model(vlm.VLMConfig(vision=vlm.VisionConfig("openai/clip-vit-large-patch14-336"),
                                          llm=vlm.LLMConfig("Qwen/Qwen2.5-0.5B-Instruct")), tokenizer=tok)
    tokenizer, model, image_processor, context_len = vlm.load_pretrained_model("runs/stage2")
    model, processor = vlm.load("runs/stage2")
    print(vlm.answer(model, processor, "photo.jpg", "What is in the picture?"))

Names are imported on first use, so `import vlm` (and the `vlm` command) does not load torch and
transformers until something needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the package metadata reads it from here (pyproject.toml)

_EXPORTS = {
    "VLMConfig": "vlm.config",
    "VisionConfig": "vlm.config",
    "ProjectorConfig": "vlm.config",
    "LLMConfig": "vlm.config",
    "build_model": "vlm.model",
    "from_pretrained": "vlm.folders.build",
    "load_pretrained_model": "vlm.folders.load",
    "VLMProcessor": "vlm.processing",
    "load": "vlm.generate.generator",
    "answer": "vlm.generate.generator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
