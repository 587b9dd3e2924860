"""Benchmark: a LoRA DPO step, ours (`train.py --method dpo`) against TRL's DPOTrainer, same llava-hf model and pairs.

    python bench/dpo.py                          # the preference demo's model, batch 8, 5 interleaved runs each
    python bench/dpo.py --repeats 1 --steps 3 --no-record                   # a smoke test
    python bench/dpo.py --image_size 64 --patch_size 8 --llm_hidden 256 --llm_layers 4     # a larger model

The model is the preference demo's (`vlm.demo.build_demo_model`: SigLIP-style tower, MLP projector, Qwen2-style
decoder, random weights from a seed) written once as a llava-hf folder (`vlm.folders.llava_hf.export_llava_hf`:
`LlavaForConditionalGeneration` weights and a `LlavaProcessor` with the ChatML template); both sides start from
that one folder. The pairs are the synthetic shapes set's (`vlm.data.synth.write_preference_pairs`): ours reads
the LLaVA-style JSON and the image folder, TRL gets the same pairs as a `datasets.Dataset` of PIL images and
conversational prompt/chosen/rejected. The same training on both sides: LoRA r=8, alpha=16, dropout 0 on every
linear layer of the language model, the projector fully trained beside it (TRL: `modules_to_save`), the reference
model = the same model with adapters disabled, sigmoid loss with beta 0.1, AdamW lr 1e-4, constant schedule,
batch `--batch` pairs per step, one torch thread, no gradient checkpointing.

Each run is a fresh process (`--worker`) going through the side's own trainer (`vlm.train.run.run` from
`RunConfig.from_flags`; `trl.DPOTrainer.train()`), data loading and collation included. Runs alternate A B A B
... so a change in the machine's load hits both alike. Time is taken at each optimizer step by a global
`torch.optim` step hook (the same clock on both sides): samples/s (pairs/s) = batch * timed steps / their time,
after `--warmup` steps. Memory: "step peak" is the highest resident memory during the timed steps above the
resident memory when they start (activations, gradients; sampled every 2 ms), "process peak" the process's
ru_maxrss (load, model, data, training).

What differs by design, and shows in the figures: TRL's collator feeds every image twice (once for the chosen,
once for the rejected row) and computes the (2B, T, V) logits; ours encodes each image once for both rows
(`image_index`) and runs the LM head on the answer positions only. TRL's completion is the chat template's
rendering after the prompt, so it scores one token more per answer than ours (the newline ChatML writes after
`<|im_end|>`; ours: the answer and `<|im_end|>`, the labels contract of DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # vlm from this checkout

from common import PeakRss, append_result, emit, load_average, parse_result, rss_mib, summarise  # noqa: E402

SIDES = ("ours", "trl")
LORA_R, LORA_ALPHA, BETA, LR = 8, 16, 0.1, 1e-4
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prepare(folder: str, args: argparse.Namespace) -> None:
    """`folder/data` (the shapes set and its pairs) and `folder/llava_hf` (the model both sides start from)."""
    import torch

    from vlm.data.synth import generate_shapes_dataset, write_preference_pairs
    from vlm.data.tokenizer import build_tokenizer
    from vlm.demo import TEMPLATE, DemoConfig, build_demo_model
    from vlm.folders.llava_hf import export_llava_hf
    from vlm.visual.processor import ImageProcessor

    n_images = args.batch * (args.warmup + args.steps)  # one epoch at most: each pair is seen once
    grid = args.image_size // args.patch_size
    generate_shapes_dataset(os.path.join(folder, "data"), n_train=n_images, n_eval=2, image_size=args.image_size,
                            grid=grid if grid <= 3 else None, seed=0, questions_per_image=1, progress=False)
    paths = write_preference_pairs(os.path.join(folder, "data"), splits=("train",))
    with open(paths["train"], encoding="utf-8") as f:
        pairs = json.load(f)
    texts = [t for p in pairs for t in (p["conversations"][0]["value"].replace("<image>", ""), p["chosen"],
                                        p["rejected"])]
    tokenizer = build_tokenizer(texts, vocab_size=512, model_max_length=256)
    config = DemoConfig(image_size=args.image_size, patch_size=args.patch_size, llm_hidden=args.llm_hidden,
                        llm_layers=args.llm_layers, grid=None)
    model = build_demo_model(config, tokenizer)
    image_processor = ImageProcessor.from_vision_config(model.vision_tower.model.config, aspect_ratio="resize")
    with torch.no_grad():
        export_llava_hf(model, os.path.join(folder, "llava_hf"), tokenizer=tokenizer, image_processor=image_processor,
                        template=TEMPLATE)


class StepClock:
    """Wall time at every optimizer step of any torch optimizer (a global step hook), and the resident-memory
    peak from the end of the warmup on."""

    def __init__(self, warmup: int):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.warmup, self.times, self.rss = warmup, [], PeakRss()
        self.base = None
        self._handle = register_optimizer_step_post_hook(self._step)

    def _step(self, optimizer, args, kwargs) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == self.warmup:
            self.base = rss_mib()
            self.rss.__enter__()

    def result(self, batch: int) -> dict:
        self._handle.remove()
        self.rss.__exit__(None, None, None)
        timed = self.times[self.warmup - 1:]
        return {"samples_per_s": batch * (len(timed) - 1) / (timed[-1] - timed[0]),
                "step_peak_mib": self.rss.peak - self.base, "steps": len(self.times),
                "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ours(folder: str, args: argparse.Namespace) -> dict:
    from vlm.train.config import RunConfig
    from vlm.train.run import run

    flags = ["--model_name_or_path", os.path.join(folder, "llava_hf"),
             "--data_path", os.path.join(folder, "data", "train_preference.json"),
             "--image_folder", os.path.join(folder, "data", "images"), "--image_aspect_ratio", "resize",
             "--output_dir", os.path.join(folder, "ours_run"), "--overwrite_output_dir", "True",
             "--method", "dpo", "--beta", str(BETA), "--loss_type", "sigmoid",
             "--lora_enable", "True", "--lora_r", str(LORA_R), "--lora_alpha", str(LORA_ALPHA), "--lora_dropout", "0",
             "--target_modules", "|".join(LLM_LINEARS), "--mm_projector_lr", str(LR),
             "--learning_rate", str(LR), "--lr_scheduler_type", "constant", "--weight_decay", "0",
             "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.warmup + args.steps),
             "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
             "--dataloader_num_workers", "0", "--seed", "0", "--disable_tqdm", "True", "--check_images", "exists"]
    result = run(RunConfig.from_flags(flags))
    logs = [json.loads(line) for line in open(os.path.join(folder, "ours_run", "metrics.jsonl"), encoding="utf-8")]
    return {"first_logps_chosen": logs[0].get("logps/chosen"), "last_loss": logs[-1]["loss"],
            "global_step": result.global_step}


def run_trl(folder: str, args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    hf_folder = os.path.join(folder, "llava_hf")
    model = LlavaForConditionalGeneration.from_pretrained(hf_folder)
    processor = AutoProcessor.from_pretrained(hf_folder)
    with open(os.path.join(folder, "data", "train_preference.json"), encoding="utf-8") as f:
        pairs = json.load(f)

    def row(pair: dict) -> dict:
        with Image.open(os.path.join(folder, "data", "images", pair["image"])) as image:
            image = image.convert("RGB")
        question = pair["conversations"][0]["value"].replace("<image>", "").strip()
        return {"images": [image],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                "rejected": [{"role": "assistant", "content": pair["rejected"]}]}

    dataset = Dataset.from_list([row(p) for p in pairs])
    config = DPOConfig(output_dir=os.path.join(folder, "trl_run"), per_device_train_batch_size=args.batch,
                       max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant",
                       weight_decay=0.0, beta=BETA, loss_type=["sigmoid"], logging_steps=1, save_strategy="no",
                       report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=rf"model\.language_model\.layers\.\d+\.\w+\.({'|'.join(LLM_LINEARS)})",
                      modules_to_save=["multi_modal_projector"])
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         peft_config=lora)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"first_logps_chosen": logs[0].get("logps/chosen"), "last_loss": logs[-1]["loss"],
            "global_step": trainer.state.global_step}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    clock = StepClock(args.warmup)  # a global optimizer hook: it sees each side's steps
    side = (run_ours if args.worker == "ours" else run_trl)(args.folder, args)
    emit({**clock.result(args.batch), **side})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steady on a busy machine)")
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--llm_hidden", type=int, default=128)
    parser.add_argument("--llm_layers", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(tmp, args)
        flags = [f"--{k}={getattr(args, k)}" for k in ("batch", "steps", "warmup", "threads", "image_size",
                                                       "patch_size", "llm_hidden", "llm_layers")]
        for repeat in range(args.repeats):
            for side in SIDES:
                done = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", tmp, *flags],
                                      capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{side} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                result = parse_result(done.stdout)
                if result["steps"] != args.warmup + args.steps:
                    sys.exit(f"{side} made {result['steps']} optimizer steps, not {args.warmup + args.steps}")
                results[side].append(result)
                print(f"run {repeat + 1} {side:<4} {result['samples_per_s']:7.2f} pairs/s  step peak "
                      f"+{result['step_peak_mib']:.0f} MiB  process peak {result['process_peak_mib']:.0f} MiB  "
                      f"load {load_average()}", flush=True)
    keys = ("samples_per_s", "step_peak_mib", "process_peak_mib")
    ours, trl = ({k: summarise([r[k] for r in results[side]]) for k in keys} for side in SIDES)
    table = ["| side | pairs/s min | pairs/s median | step peak MiB min | median | process peak MiB min | median |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in (("ours (train.py --method dpo)", ours), ("TRL DPOTrainer", trl)):
        table.append(f"| {name} | {r['samples_per_s'][0]:.2f} | {r['samples_per_s'][1]:.2f} | "
                     f"{r['step_peak_mib'][0]:.1f} | {r['step_peak_mib'][1]:.1f} | "
                     f"{r['process_peak_mib'][0]:.0f} | {r['process_peak_mib'][1]:.0f} |")
    table.append(f"| ratio ours/TRL (median) | | {ours['samples_per_s'][1] / trl['samples_per_s'][1]:.2f}x | | "
                 f"{ours['step_peak_mib'][1] / max(trl['step_peak_mib'][1], 1e-9):.2f}x | | "
                 f"{ours['process_peak_mib'][1] / trl['process_peak_mib'][1]:.2f}x |")
    notes = [f"Model: the preference demo's ({args.image_size} px, patch {args.patch_size}, "
             f"{(args.image_size // args.patch_size) ** 2} image tokens; Qwen2-style "
             f"{args.llm_layers}x{args.llm_hidden}),"
             f" batch {args.batch} pairs, {args.warmup} warmup + {args.steps} timed steps, {args.threads} thread(s). "
             f"First logged logps/chosen (mean): ours {results['ours'][0]['first_logps_chosen']}, "
             f"TRL {results['trl'][0]['first_logps_chosen']} (TRL scores one token more per answer: the newline "
             "after <|im_end|>). Busy machine: other engineers' work ran on the same 2 cores; compare min and "
             "median."]
    print("\n".join(table + notes))
    if not args.no_record:
        append_result("LoRA DPO step, ours vs TRL's DPOTrainer (issue 13)",
                      " ".join(["python bench/dpo.py", *sys.argv[1:]]),
                      table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
