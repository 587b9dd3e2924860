"""vlm: build, train and run LLaVA-style vision-language models."""
