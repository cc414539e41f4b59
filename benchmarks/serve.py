"""Serving throughput and latency: `vlmkit serve` (continuous batching) against transformers' `generate`
called per request in turn, on the same random-weight checkpoint, in one run.

The checkpoint has the demo model's tokenizer and chat template and a bigger body (default: a 12-layer
768-wide LLaMA, a CLIP-B/16 tower at 224 px). Requests are shapes-world questions, each with its own picture,
greedy, `max_tokens` new tokens. For 1, 4 and 16 concurrent clients (each sends its next request when its
last one is answered):
- vlmkit: a live server on 127.0.0.1, the official `openai` client in threads; aggregate completion tokens/s
  and p50/p99 request latency.
- transformers: the same requests, the same inputs (vlmkit's processor), `generate` one request at a time;
  its latencies are those of the same closed loop of clients served first come, first served.
Then time to first token of a new picture and of a repeated one (the image-feature cache), streamed.

    .venv/bin/python benchmarks/serve.py [--family vipllava] [--clients 1 4 16] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build(folder: Path, family: str, layers: int, width: int) -> None:
    """The demo model's processor files with a bigger random body, saved in the published layout."""
    from vlmkit.demo import build as demo
    from vlmkit.models import init_model

    ids = demo.build_tokenizer(folder, family)
    demo.write_configs(folder, family, ids)
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "processor_config.json").read_text())
    vision = {"image_size": 224, "patch_size": 16, "num_hidden_layers": 12, "num_attention_heads": 12}
    if family == "vipllava":
        config["text_config"].update(
            hidden_size=width,
            intermediate_size=width * 11 // 4,
            num_hidden_layers=layers,
            num_attention_heads=12,
        )
        config["vision_config"].update(vision, hidden_size=768, intermediate_size=3072)
        config["image_seq_length"] = (224 // 16) ** 2
        config["vision_feature_layers"] = [-2, -5, -8, -11, 6]
        processor["patch_size"] = 16
        processor["image_processor"]["size"] = {"shortest_edge": 224}
        processor["image_processor"]["crop_size"] = {"height": 224, "width": 224}
    else:
        config.update(
            hidden_size=width,
            intermediate_size=width * 11 // 4,
            num_hidden_layers=layers,
            num_attention_heads=12,
            cross_layer_interval=4,
            use_resampler=True,
        )
        config["vision_config"].update(vision, embed_dim=768, intermediate_size=3072)
        config["perceiver_config"] = {
            "resampler_n_latents": 64,
            "resampler_depth": 2,
            "resampler_n_heads": 12,
            "resampler_head_dim": 64,
        }
        processor["image_processor"]["image_size"] = 224
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    init_model(config, seed=0).save_pretrained(folder)


def requests(family: str, n: int, seed: int) -> list:
    from vlmkit.demo.shapes import QUESTION_TYPES, make_example

    rng = random.Random(seed)
    kinds = QUESTION_TYPES[family]
    return [make_example(rng, kinds[i % len(kinds)], 224) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def closed_loop(service: list[float], clients: int) -> list[float]:
    """Latencies of requests served one at a time, first come first served, by `clients` clients that each
    send their next request when the last is answered (all start at 0)."""
    ready = [(0.0, c) for c in range(clients)]  # (time the client's next request arrives, client)
    heapq.heapify(ready)
    free_at, latencies = 0.0, []
    for s in service:
        arrive, c = heapq.heappop(ready)
        start = max(arrive, free_at)
        free_at = start + s
        latencies.append(free_at - arrive)
        heapq.heappush(ready, (free_at, c))
    return latencies


def reference(folder: Path, family: str, batch: list, max_tokens: int) -> tuple[list[float], list[int]]:
    """transformers' generate per request: service times and completion tokens."""
    from transformers import AutoModelForImageTextToText, IdeficsForVisionText2Text

    import vlmkit
    from vlmkit.vlm import user_turn

    cls = IdeficsForVisionText2Text if family == "idefics" else AutoModelForImageTextToText
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    vlm = vlmkit.VLM(vlmkit.load_model(folder), vlmkit.load_processor(folder))  # its processor only
    eos = vlm._settings({})["eos_token_id"]
    times, tokens = [], []
    for i, ex in enumerate([batch[0], *batch]):  # the first is a warm-up
        start = time.perf_counter()
        inputs = vlm.chat_inputs([user_turn(ex.question, ex.images)])
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        if i:
            times.append(time.perf_counter() - start)
            tokens.append(next((j + 1 for j, t in enumerate(new) if t in eos), len(new)))
    return times, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["vipllava", "idefics"], default="vipllava")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    args = ap.parse_args()
    torch.set_num_threads(2)

    import httpx
    import openai
    from test_serve import free_port
    from test_serve import openai_messages as messages

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.family, args.layers, args.width)
        # the server in its own process, as deployed: its engine thread shares no interpreter lock with the
        # clients here
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "vlmkit", "serve", "--model", str(folder), "--port", str(port)]
            + ["--max-batch", "16", "--max-seq-len", "1024", "--max-image-pixels", str(10**7)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def ask(ex) -> tuple[float, int]:
            start = time.perf_counter()
            r = client.chat.completions.create(
                model="bench", messages=messages(ex), max_tokens=args.max_tokens, temperature=0
            )
            return time.perf_counter() - start, r.usage.completion_tokens

        ask(requests(args.family, 1, 999)[0])  # warm-up
        rows = []
        for clients in args.clients:
            batch = requests(args.family, max(8, 2 * clients), seed=clients)
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(ask, batch))
            wall = time.perf_counter() - start
            ours = {
                "tok_s": sum(t for _, t in results) / wall,
                "p50": pct([s for s, _ in results], 0.5),
                "p99": pct([s for s, _ in results], 0.99),
            }
            service, tokens = reference(folder, args.family, batch, args.max_tokens)
            lat = closed_loop(service, clients)
            ref = {"tok_s": sum(tokens) / sum(service), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
            rows.append((clients, len(batch), ref, ours))

        def first_token(ex) -> float:
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model="bench", messages=messages(ex), max_tokens=2, temperature=0, stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            elapsed = time.perf_counter() - start
            for _ in stream:
                pass
            return elapsed

        fresh, repeated = [], []
        for ex in requests(args.family, 5, seed=4242):
            fresh.append(first_token(ex))
            repeated.append(first_token(ex))
        server.terminate()
        server.wait(30)

    print(f"\n{args.family}: {args.layers}-layer {args.width}-wide LLaMA, CLIP-B/16 at 224 px, fp32, greedy")
    print("| clients | requests | tok/s tf → vlmkit | p50 latency tf → vlmkit | p99 latency tf → vlmkit |")
    print("|---|---|---|---|---|")
    for clients, n, ref, ours in rows:
        print(
            f"| {clients} | {n} | {ref['tok_s']:.1f} → {ours['tok_s']:.1f} (**{ours['tok_s'] / ref['tok_s']:.2f}x**) "
            f"| {ref['p50']:.2f} → {ours['p50']:.2f} s | {ref['p99']:.2f} → {ours['p99']:.2f} s |"
        )
    f, r = statistics.median(fresh), statistics.median(repeated)
    print(
        f"\ntime to first token: new picture {f * 1000:.0f} ms, repeated picture {r * 1000:.0f} ms ({f / r:.2f}x)"
    )


if __name__ == "__main__":
    main()
