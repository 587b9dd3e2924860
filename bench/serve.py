"""Benchmark: `vlm serve` under 32 concurrent requests, batching on (`--max_batch_size 8`) against off (1).

    python bench/serve.py                           # the demo's architecture (random weights), 3 rounds
    python bench/serve.py --model runs/demo/model   # a model folder of your own
    python bench/serve.py --rounds 1 --requests 8 --no-record                     # a smoke test
    python bench/serve.py --stream                  # streamed requests (`stream: true`), batched since 2d6f8c0

The server is the command line (`python -m vlm serve`, a subprocess on `--threads` torch threads); the clients
are threads of this process using the official `openai` client, all released at once by a barrier, each with
its own question and picture (a data URL) and `max_tokens` new tokens, greedy. Per mode: latency p50/p95 over
every request of every round, requests/s and generated tokens/s per round (median), and the server's own
counters (generate calls, batch sizes, from `/health`). The answers of the two modes are checked to be equal.
With `--stream` every request streams (server-sent events; its latency is to the last chunk, and the time to the
first text chunk is reported too); batching off is what streamed requests got before they were batched.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_result, load_average  # noqa: E402

QUESTIONS = ["What color is the circle?", "What shape is the red one?", "How many shapes are there?",
             "Is there a blue square?", "Describe the picture."]


def demo_sized_folder(folder: str) -> str:
    """A model folder with the demo's architecture (`vlm.demo.DemoConfig`'s sizes), random weights, chatml, the LLM's
    output layer untied from its embeddings: a random tied model only repeats the prompt's last token (a newline
    here), whose answers strip to "" and would make the check that both modes answer alike an empty one."""
    import torch

    import vlm
    from vlm.data.tokenizer import build_tokenizer
    from vlm.demo import DemoConfig
    from vlm.folders.kinds import record_template
    from vlm.folders.weights import save_model_folder
    from vlm.tiny import tiny_llm_config, tiny_vision_config
    from vlm.visual.processor import ImageProcessor

    tokenizer = build_tokenizer([q + " red green blue yellow circle square triangle yes no 1 2 3" for q in QUESTIONS]
                                * 8, vocab_size=512, model_max_length=256)
    demo = DemoConfig()
    vision = tiny_vision_config("siglip", hidden_size=demo.vision_hidden, image_size=demo.image_size,
                                patch_size=demo.patch_size, num_layers=demo.vision_layers)
    llm = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=demo.llm_hidden, num_layers=demo.llm_layers,
                          tie_word_embeddings=False)
    torch.manual_seed(demo.seed)
    model = vlm.build_model(vlm.VLMConfig(
        vision=vlm.VisionConfig(hf_config=vision.to_dict(), select_layer=demo.select_layer, select_feature="patch"),
        projector=vlm.ProjectorConfig(type=demo.projector), llm=vlm.LLMConfig(hf_config=llm.to_dict())),
        tokenizer=tokenizer)
    save_model_folder(folder, model, tokenizer=tokenizer,
                      image_processor=ImageProcessor.from_vision_config(model.vision_tower.model.config,
                                                                        aspect_ratio="resize"))
    record_template(folder, "chatml")
    return folder


def pictures(n: int) -> list[str]:
    """`n` different small pictures as PNG data URLs."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    urls = []
    for _ in range(n):
        image = Image.new("RGB", (48, 48), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            x, y = rng.randrange(0, 36), rng.randrange(0, 36)
            draw.rectangle([x, y, x + 10, y + 10], fill=tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def start_server(model: str, port: int, args, max_batch_size: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm", "serve", "--model", model, "--port", str(port), "--served_model_name", "bench",
         "--max_batch_size", str(max_batch_size), "--batch_wait_ms", str(args.batch_wait_ms),
         "--max_queue", str(max(64, args.requests)), "--log_level", "warning", "--device", args.device],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vlm serve exited: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("vlm serve did not start in 300 s")
        try:
            get_json(f"http://127.0.0.1:{port}/health")
            return process
        except OSError:
            time.sleep(0.2)


def one_round(api, cases: list[tuple[str, str]], max_tokens: int, stream: bool = False
              ) -> tuple[list[float], list[float], list[int], list[str], float]:
    """All `cases` at once; (latencies s, times to the first text s (streamed; else the latencies), completion
    tokens, answers, wall s)."""
    barrier = threading.Barrier(len(cases) + 1)
    latencies, firsts, tokens, answers = [0.0] * len(cases), [0.0] * len(cases), [0] * len(cases), [""] * len(cases)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        question, url = cases[i]
        barrier.wait()
        start = time.perf_counter()
        try:
            response = api.chat.completions.create(
                model="bench", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": question}]}],
                **({"stream": True, "stream_options": {"include_usage": True}} if stream else {}))
            if stream:
                pieces = []
                for chunk in response:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if not pieces:
                            firsts[i] = time.perf_counter() - start
                        pieces.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        tokens[i] = chunk.usage.completion_tokens
                answers[i] = "".join(pieces)
        except BaseException as exc:  # noqa: BLE001 - reported after the round
            errors.append(exc)
            return
        latencies[i] = time.perf_counter() - start
        if not stream:
            firsts[i] = latencies[i]
            tokens[i] = response.usage.completion_tokens
            answers[i] = response.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, the first: {errors[0]!r}")
    return latencies, firsts, tokens, answers, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo's architecture, random)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="--max_batch_size of the batching server")
    parser.add_argument("--batch_wait_ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream", action="store_true", help="every request streams (stream: true)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    import openai

    urls = pictures(args.requests)
    cases = [(QUESTIONS[i % len(QUESTIONS)], urls[i]) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or demo_sized_folder(os.path.join(tmp, "model"))
        results = {}
        for mode, size in (("batching on", args.batch), ("batching off", 1)):
            port = free_port()
            server = start_server(model, port, args, size)
            try:
                api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
                one_round(api, cases[:4], args.max_tokens, args.stream)  # warm-up
                before = get_json(f"http://127.0.0.1:{port}/health")
                latencies, firsts, rps, tps, answers = [], [], [], [], None
                for _ in range(args.rounds):
                    lat, first, tokens, answers, wall = one_round(api, cases, args.max_tokens, args.stream)
                    latencies += lat
                    firsts += first
                    rps.append(len(cases) / wall)
                    tps.append(sum(tokens) / wall)
                after = get_json(f"http://127.0.0.1:{port}/health")
            finally:
                server.terminate()
                server.wait(timeout=30)
            sizes = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
            results[mode] = dict(p50=percentile(latencies, 50), p95=percentile(latencies, 95),
                                 first50=percentile(firsts, 50),
                                 rps=statistics.median(rps), tps=statistics.median(tps),
                                 calls=(after["generate_calls"] - before["generate_calls"]) / args.rounds,
                                 sizes={k: v for k, v in sizes.items() if v}, answers=answers)
            r = results[mode]
            print(f"{mode}: p50 {r['p50']:.3f} s, p95 {r['p95']:.3f} s, first text p50 {r['first50']:.3f} s, "
                  f"{r['rps']:.2f} req/s, {r['tps']:.1f} tok/s, "
                  f"{r['calls']:.1f} generate calls per round, batch sizes {r['sizes']}", flush=True)
    on, off = results["batching on"], results["batching off"]
    same = sum(a == b for a, b in zip(on["answers"], off["answers"]))
    print(f"answers equal between modes: {same}/{len(cases)}; the first: {on['answers'][0]!r}")
    if args.no_record:
        return 0
    command = " ".join(["python bench/serve.py", *sys.argv[1:]])
    first = " first text p50 s |" if args.stream else ""
    table = [f"| mode | latency p50 s | latency p95 s |{first} requests/s | tokens/s | generate calls per round | "
             "batch sizes |", "| --- " * (7 + bool(args.stream)) + "|"]
    for mode, r in results.items():
        first = f" {r['first50']:.3f} |" if args.stream else ""
        table.append(f"| {mode} (max_batch_size {args.batch if mode == 'batching on' else 1}) | {r['p50']:.3f} | "
                     f"{r['p95']:.3f} |{first} {r['rps']:.2f} | {r['tps']:.1f} | {r['calls']:.1f} | {r['sizes']} |")
    first = f" {on['first50'] / off['first50']:.2f}x |" if args.stream else ""
    table.append(f"| on / off | {on['p50'] / off['p50']:.2f}x | {on['p95'] / off['p95']:.2f}x |{first} "
                 f"{on['rps'] / off['rps']:.2f}x | {on['tps'] / off['tps']:.2f}x | | |")
    kind = "streamed requests (stream: true; latency to the last chunk)" if args.stream else "requests"
    notes = [textwrap.fill(f"{args.requests} concurrent {kind} per round (one picture + one question each, "
             f"{args.max_tokens} new tokens at most, greedy), {args.rounds} round(s) after a warm-up; model: "
             f"{args.model or 'the demo architecture, random weights, untied output layer'}; server on "
             f"{args.threads} torch thread(s), "
             f"--batch_wait_ms {args.batch_wait_ms}; latencies over all rounds, rates the median round. Answers equal "
             f"between modes: {same}/{len(cases)}. Load at the end {load_average()}: a shared 2-core machine with "
             "other work running, so absolute figures are noisy; the ratio is the figure to read.", width=116)]
    title = "streamed requests" if args.stream else "requests"
    append_result(f"Serving: {args.requests} concurrent {title}, batching on vs off (issue 14)", command, table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
