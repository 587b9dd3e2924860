from vlm.llm.mixin import VLMMixin
from vlm.llm.models import LLM_CLASSES, llm_class_for
from vlm.llm.splice import image_token_mask, scatter_image_features

__all__ = ["VLMMixin", "LLM_CLASSES", "llm_class_for", "image_token_mask", "scatter_image_features"]
