"""Model folders: their kinds and files, saving and loading them. Layer 2: uses the components (config, visual,
projector, llm, data) and the model composition (`vlm.model`).

| module            | job                                                                                    |
| ----------------- | -------------------------------------------------------------------------------------- |
| `kinds`           | what a path holds (vlm folder, LoRA run, LLaVA-1.5, llava-hf, plain LLM), read from its files; required files; Hub ids; the folder's tokenizer, image processor and chat template |
| `weights`         | safetensors in and out (sharded), strict key checks, saving a vlm folder               |
| `build`           | the one strict build-and-load path every loader uses; `from_pretrained` (vlm folders)  |
| `load`            | `load_pretrained_model`: any kind in, (tokenizer, model, image processor, context) out |
| `lora`            | LoRA runs: wrap, save, load, resume, merge                                             |
| `llava_original`, `llava_hf`, `keymap` | the LLaVA-1.5 and llava-hf formats and their key tables           |
| `export`          | a model folder out as llava-hf                                                         |

Imports go one way (no cycle): kinds, weights <- build <- llava_* <- lora <- load <- export.
"""
