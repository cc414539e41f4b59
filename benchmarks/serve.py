"""Serving throughput and latency: `vlmkit serve` (continuous batching) against transformers' `generate`
called per request in turn, on the same random-weight checkpoint, in one run.

The checkpoint has the demo model's tokenizer and chat template and a bigger body (default: a 12-layer
768-wide LLaMA, a CLIP-B/16 tower at 224 px). Requests are shapes-world questions, greedy. Each run is
WORKLOAD:MAX_TOKENS:CLIENTS, clients in a closed loop (each sends its next request when its last one is
answered):
- fresh: every request a new picture, one question (2 x clients requests, at least 8);
- chat: every client a conversation of three turns about its own picture: a question, then two follow-ups
  that resend the conversation so far (picture included), as chat clients do.
vlmkit: `vlmkit serve` in its own process on 127.0.0.1, the official `openai` client in threads; aggregate
completion tokens/s and p50/p99 request latency. transformers: the same requests (the conversations as
vlmkit's clients sent them), the same inputs (vlmkit's processor), `generate` one request at a time, run
right after vlmkit's run (this machine's speed drifts); its latencies are those of the same closed loop of
clients served first come, first served.
Then time to first token of a new picture and of the same request again (prefix and feature caches).

    .venv/bin/python benchmarks/serve.py [--family vipllava] [--runs fresh:24:1 fresh:24:16 chat:24:16 ...]

`--features` measures instead, in-process on the engine (no HTTP), on the demo model and on the checkpoint
above, each run several times in alternation (6 on the demo model, whose runs take a fraction of a second;
2 on the bigger one) and the best kept:
- LoRA: 16 requests of 48 tokens (each its own picture and question) spread over 4 adapters (random rank-8 peft folders on q/k/v/o/gate/up/down,
  as `finetune --train lora --lora-targets ...` would write) against the same 16 on the base model: decode
  tokens/s, and their ratio (goal: at least 70%);
- structured output: 8 requests (and 1) of 48 tokens held to a JSON schema whose string never closes
  within them, against the same requests free (their end token banned with logit_bias, so both runs make
  exactly 48 tokens per row): tokens/s and the overhead per token (goal: under 10% of a decode step).
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
from functools import partial
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


FOLLOW_UPS = ["Are you sure? Look again.", "What else is in the picture?"]


def requests(family: str, n: int, seed: int) -> list:
    from vlmkit.demo.shapes import QUESTION_TYPES, make_example

    rng = random.Random(seed)
    kinds = QUESTION_TYPES[family]
    return [make_example(rng, kinds[i % len(kinds)], 224) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def closed_loop(service: list[list[float]], clients: int) -> list[float]:
    """Latencies of requests served one at a time, first come first served, when `clients` clients work
    through the jobs (each a list of turns' service times) in order, each sending its next request when
    its last is answered (all start at 0)."""
    ready = [(0.0, c) for c in range(clients)]  # (time the client's next request arrives, client)
    heapq.heapify(ready)
    pending = [list(job) for job in service]  # turns left per job
    owner: dict[int, int] = {}  # client -> job it is working through
    jobs = iter(range(len(service)))
    free_at, latencies = 0.0, []
    while ready:
        arrive, c = heapq.heappop(ready)
        if c not in owner or not pending[owner[c]]:
            j = next(jobs, None)
            if j is None:
                continue
            owner[c] = j
        s = pending[owner[c]].pop(0)
        start = max(arrive, free_at)
        free_at = start + s
        latencies.append(free_at - arrive)
        heapq.heappush(ready, (free_at, c))
    return latencies


class Reference:
    """transformers' generate per request, with vlmkit's processor for the inputs."""

    def __init__(self, folder: Path, family: str) -> None:
        from transformers import AutoModelForImageTextToText, IdeficsForVisionText2Text

        import vlmkit

        cls = IdeficsForVisionText2Text if family == "idefics" else AutoModelForImageTextToText
        # transformers 5.23 cannot build an IDEFICS model whose alpha_initializer is "normal" (it calls
        # torch.normal with an int size); the alphas are loaded from the checkpoint anyway
        extra = {"alpha_initializer": "zeros"} if family == "idefics" else {}
        self.model = cls.from_pretrained(folder, dtype=torch.float32, **extra).eval()
        self.vlm = vlmkit.VLM(vlmkit.load_model(folder), vlmkit.load_processor(folder))  # its processor only
        self.eos = self.vlm._settings({})["eos_token_id"]

    def __call__(self, conversation: list[dict], max_tokens: int) -> tuple[float, int]:
        """Service time and completion tokens of one request."""
        start = time.perf_counter()
        inputs = self.vlm.chat_inputs(conversation)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=self.eos, pad_token_id=0
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        return time.perf_counter() - start, next(
            (j + 1 for j, t in enumerate(new) if t in self.eos), len(new)
        )


def random_adapter(folder: Path, model: torch.nn.Module, family: str, seed: int) -> Path:
    """A rank-8 LoRA folder in peft's layout on every attention and MLP projection of the language model."""
    from safetensors.torch import save_file

    from vlmkit.models import family_of

    scope = family_of(model).trainable.lora_scope
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") and any(
            name.startswith(p + ".") for p in scope
        ):
            tensors[f"base_model.model.{name}.lora_A.weight"] = (
                torch.randn(8, module.in_features, generator=g) * 0.02
            )
            tensors[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, 8, generator=g) * 0.02
            )
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ".*_proj$", "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def engine_tokens_per_s(vlm, jobs: list[dict], *, adapters=None, max_batch: int = 16) -> float:
    """Submit every job (SamplingParams fields, plus `adapter`) at once to a fresh engine; completion tokens/s."""
    import threading

    from vlmkit.models import family_of
    from vlmkit.serve.engine import Engine, Request, SamplingParams
    from vlmkit.vlm import user_turn

    engine = Engine(
        vlm.model, vlm.tokenizer, max_batch=max_batch, max_seq_len=1024, adapters=adapters
    ).start()
    # every job its own picture and question: no job's prompt comes from another's prefix-cache blocks
    questions = requests(family_of(vlm.model).name, len(jobs), 0)
    prompts = [vlm.chat_inputs([user_turn(q.question, q.images)]) for q in questions]
    done, requests_ = threading.Event(), []
    left = [len(jobs)]

    def finished(ev) -> None:
        if ev.finish_reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    started = time.perf_counter()
    for job, inputs in zip(jobs, prompts, strict=True):
        job = dict(job)
        adapter = job.pop("adapter", None)
        r = Request(inputs=inputs, params=SamplingParams(**job), emit=finished, adapter=adapter)
        requests_.append(r)
        engine.submit(r)
    done.wait()
    elapsed = time.perf_counter() - started
    engine.stop()
    return sum(r.completion_tokens for r in requests_) / elapsed


def features(folder: Path, family: str, repeats: int) -> dict:
    """The LoRA and structured-output figures of one checkpoint (see the module docstring), the best of
    `repeats` alternating runs each."""
    import vlmkit
    from vlmkit.adapters import AdapterSet
    from vlmkit.structured import Constraint

    vlm = vlmkit.VLM.load(folder, batched=True)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = AdapterSet(vlm.model, max_loaded=4)
        for i in range(4):
            adapters.add(f"a{i}", random_adapter(Path(tmp) / f"a{i}", vlm.model, family, i))
        eos = vlm.tokenizer.eos_token_id
        base = [dict(max_tokens=48, logit_bias={eos: -100.0})] * 16
        spread = [dict(max_tokens=48, logit_bias={eos: -100.0}, adapter=f"a{i % 4}") for i in range(16)]
        best = {"base": 0.0, "lora": 0.0}
        for _ in range(repeats):
            best["base"] = max(best["base"], engine_tokens_per_s(vlm, base, adapters=adapters))
            best["lora"] = max(best["lora"], engine_tokens_per_s(vlm, spread, adapters=adapters))
        out["lora_16_over_4_tok_s"], out["base_16_tok_s"] = best["lora"], best["base"]
        out["lora_ratio"] = best["lora"] / best["base"]
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 2000}},
        "required": ["text"],
    }
    json_schema = Constraint("json_schema", schema)
    for rows in (1, 8):
        free = [dict(max_tokens=48, logit_bias={eos: -100.0})] * rows
        held = [dict(max_tokens=48, constraint=json_schema)] * rows
        best = {"free": 0.0, "held": 0.0}
        for _ in range(repeats):
            best["free"] = max(best["free"], engine_tokens_per_s(vlm, free, max_batch=8))
            best["held"] = max(best["held"], engine_tokens_per_s(vlm, held, max_batch=8))
        out[f"free_b{rows}_tok_s"], out[f"json_b{rows}_tok_s"] = best["free"], best["held"]
        out[f"json_overhead_b{rows}"] = best["free"] / best["held"] - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["vipllava", "idefics"], default="vipllava")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["fresh:24:1", "fresh:24:4", "fresh:24:16", "fresh:128:16", "chat:24:16"],
        help="WORKLOAD:MAX_TOKENS:CLIENTS, workload fresh or chat",
    )
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--features", action="store_true", help="LoRA and structured-output figures instead")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.features:
        from vlmkit.models import builtin_model

        demo = builtin_model("demo" if args.family == "vipllava" else "demo-idefics")
        report = {"demo": features(demo, args.family, repeats=6)}  # runs of a fraction of a second: more
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), args.family, args.layers, args.width)
            report[f"{args.layers}x{args.width}"] = features(Path(tmp), args.family, repeats=2)
        for name, r in report.items():
            print(
                f"{name}: 16 requests over 4 adapters {r['lora_16_over_4_tok_s']:.1f} tok/s vs base "
                f"{r['base_16_tok_s']:.1f} ({100 * r['lora_ratio']:.0f}%); JSON schema b1 {r['json_b1_tok_s']:.1f} "
                f"vs free {r['free_b1_tok_s']:.1f} tok/s (+{100 * r['json_overhead_b1']:.1f}% per token), b8 "
                f"{r['json_b8_tok_s']:.1f} vs {r['free_b8_tok_s']:.1f} (+{100 * r['json_overhead_b8']:.1f}%)"
            )
        print(json.dumps(report))
        return
    runs = []
    for run in args.runs:
        workload, max_tokens, clients = run.split(":")
        if workload not in ("fresh", "chat"):
            raise SystemExit(f"unknown workload {workload!r} in {run!r}: use fresh or chat")
        runs.append((workload, int(max_tokens), int(clients)))

    import httpx
    import openai
    from test_serve import free_port, openai_messages

    from vlmkit.vlm import user_turn

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

        def converse(ex, turns: int, max_tokens: int) -> list[tuple[float, int, list[dict]]]:
            """One client's conversation: per turn its latency, completion tokens and the conversation sent
            (in vlmkit's message form, for the reference)."""
            sent = openai_messages(ex)
            ours = [user_turn(ex.question, ex.images)]
            out = []
            for t in range(turns):
                start = time.perf_counter()
                r = client.chat.completions.create(
                    model="bench", messages=sent, max_tokens=max_tokens, temperature=0
                )
                out.append((time.perf_counter() - start, r.usage.completion_tokens, list(ours)))
                answer = r.choices[0].message.content
                if t + 1 < turns:
                    follow = FOLLOW_UPS[t % len(FOLLOW_UPS)]
                    sent += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow}]
                    ours += [
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                        user_turn(follow),
                    ]
            return out

        converse(requests(args.family, 1, 999)[0], 1, 4)  # warm-up
        reference = Reference(folder, args.family)
        reference([user_turn("warm-up", requests(args.family, 1, 999)[0].images)], 4)
        rows = []
        for workload, max_tokens, clients in runs:
            turns = 3 if workload == "chat" else 1
            jobs = requests(
                args.family, clients if turns > 1 else max(8, 2 * clients), seed=clients + max_tokens
            )
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(partial(converse, turns=turns, max_tokens=max_tokens), jobs))
            wall = time.perf_counter() - start
            flat = [turn for job in done for turn in job]
            ours = {
                "tok_s": sum(t for _, t, _ in flat) / wall,
                "p50": pct([s for s, _, _ in flat], 0.5),
                "p99": pct([s for s, _, _ in flat], 0.99),
            }
            # right after, so that the two see the same machine (a shared one drifts by tens of percent)
            service = [[reference(conv, max_tokens) for _, _, conv in job] for job in done]
            lat = closed_loop([[s for s, _ in job] for job in service], clients)
            tokens = sum(t for job in service for _, t in job)
            seconds = sum(s for job in service for s, _ in job)
            ref = {"tok_s": tokens / seconds, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
            rows.append((workload, max_tokens, clients, len(flat), ref, ours))
        fresh, repeated = [], []
        for ex in requests(args.family, 5, seed=4242):
            fresh.append(first_token(client, ex))
            repeated.append(first_token(client, ex))
        server.terminate()
        server.wait(30)

    print(f"\n{args.family}: {args.layers}-layer {args.width}-wide LLaMA, CLIP-B/16 at 224 px, fp32, greedy")
    print(
        "| workload | max tokens | clients | requests | tok/s tf → vlmkit | p50 latency tf → vlmkit "
        "| p99 latency tf → vlmkit |"
    )
    print("|---|---|---|---|---|---|---|")
    for workload, max_tokens, clients, n, ref, ours in rows:
        print(
            f"| {workload} | {max_tokens} | {clients} | {n} | {ref['tok_s']:.1f} → {ours['tok_s']:.1f} "
            f"(**{ours['tok_s'] / ref['tok_s']:.2f}x**) | {ref['p50']:.2f} → {ours['p50']:.2f} s "
            f"| {ref['p99']:.2f} → {ours['p99']:.2f} s |"
        )
    f, r = statistics.median(fresh), statistics.median(repeated)
    print(
        f"\ntime to first token: new picture {f * 1000:.0f} ms, repeated picture {r * 1000:.0f} ms ({f / r:.2f}x)"
    )


def first_token(client, ex) -> float:
    from test_serve import openai_messages

    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="bench", messages=openai_messages(ex), max_tokens=2, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    elapsed = time.perf_counter() - start
    for _ in stream:
        pass
    return elapsed


if __name__ == "__main__":
    main()
