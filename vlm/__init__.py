"""vlm: build, train and run LLaVA-style vision-language models.

    import vlm
    model = vlm.build_model(vlm.VLMConfig(vision=vlm.VisionConfig("openai/clip-vit-large-patch14-336"),
                                          llm=vlm.LLMConfig("Qwen/Qwen2.5-0.5B-Instruct")), tokenizer=tok)
"""

from vlm.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlm.model import build_model, from_pretrained

__all__ = ["VLMConfig", "VisionConfig", "ProjectorConfig", "LLMConfig", "build_model", "from_pretrained"]
