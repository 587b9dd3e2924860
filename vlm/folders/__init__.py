"""Model folders: their kinds and files, saving and loading them (weights, vlm folders, LoRA runs, original
LLaVA-1.5 and llava-hf folders), merging LoRA runs and exporting to llava-hf. Layer 2: uses the components
(config, visual, projector, llm, data) and the model composition (`vlm.model`)."""
