from setuptools import find_packages, setup

setup(
    name="vlm",
    version="0.1.0",
    description="Build, train and run LLaVA-style vision-language models with PyTorch.",
    packages=find_packages(include=["vlm", "vlm.*"]),
    python_requires=">=3.10",
    # torch is pinned: an unpinned requirement pulls the CUDA build (several GB) on a CPU machine.
    install_requires=[
        "torch==2.13.0",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        # LLaMA / Vicuna / LLaVA-1.5 folders ship only tokenizer.model: transformers 5 converts it with these
        "sentencepiece>=0.2",
        "protobuf>=4",
        "einops>=0.8",
        "pillow>=10",
        "tqdm>=4.66",
        "pyyaml>=6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # bitsandbytes 0.50 ships a CPU backend: QLoRA (--bits 4|8) and --load-4bit/--load-8bit run anywhere.
        "qlora": ["bitsandbytes>=0.50"],
        "gpu": ["flash-attn>=2.5", "deepspeed>=0.15", "bitsandbytes>=0.50"],
        # the tests run QLoRA on bitsandbytes' CPU backend
        "dev": ["pytest>=8", "bitsandbytes>=0.50"],
    },
    entry_points={"console_scripts": ["vlm=vlm.cli:main"]},
)
