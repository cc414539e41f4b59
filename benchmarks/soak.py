"""Soak: `vlmkit serve` in its own process under mixed good and bad traffic from 16 clients for a while, its
memory sampled, its /health timed and its /metrics reconciled with what the clients saw.

    .venv/bin/python benchmarks/soak.py --duration 1800 [--model demo] [--json soak.json] [SERVE FLAGS ...]

Flags this script does not know go to `vlmkit serve` as they are (`--prefix-cache-mb 64`, `--max-batch 8`).
Each client sends, at random (weights in KINDS): non-streaming chat and completion requests (pictures as
data: URIs, visual prompts drawn by the server, prompts repeated so the prefix cache hits, fresh ones so it
grows), streams, bad requests (malformed JSON, unknown fields, wrong types, a visual prompt's huge width,
bodies over --max-body-bytes with and without a Content-Length, an unknown path), streams closed after a few
chunks and non-streaming requests whose socket is closed before the answer. `--weights KIND=N ...` changes the
mix; `abandoned_mid_body` sockets close before their request body is complete.

Every second the server's RSS (VmRSS of /proc/PID/status) and the prefix cache's size (/metrics:
vlmkit_prefix_cache_blocks and _bytes) are sampled; /health is timed every 0.25 s. At the end the server's
`vlmkit_requests_total{route, status}` must equal the clients' own tally. A client sees the status of every
request but the abandoned ones (socket closed before the answer): the server counts each of those as 499 when
it noticed the disconnect first, or 200 when the answer was complete first, so per route the clients' 200s
plus their abandoned requests must equal the server's 200s plus 499s, and every other status must match one
for one.

The run fails (exit status 1) on any 5xx, a /health answer slower than 1 s, metrics that do not reconcile, a
request the client got no answer to, a greedy answer that changed between two identical requests, RSS less the
prefix cache drifting beyond +-5% after the warm-up, or the server dying.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vlmkit.serve.launch import start_serve

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HEALTH_LIMIT_S = 1.0
DRIFT_LIMIT_PCT = 5.0
METRIC_LINE = re.compile(r'^vlmkit_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)$')
# a request whose socket the client closed before the answer: 200 or 499 on the server
ABANDONED = "abandoned"


# -- the pictures and prompts -------------------------------------------------------------------


@dataclass
class Material:
    """Pictures (as data: URIs, with their questions) and prompts, made once before the traffic starts."""

    pictures: list[tuple[str, str, int]]  # (data URI, question, picture side in pixels)
    prompts: list[str]  # repeated completion prompts (prefix-cache hits)
    body_limit: int

    @classmethod
    def make(cls, family: str, body_limit: int, seed: int) -> Material:
        from vlmkit.demo.shapes import QUESTION_TYPES, make_example

        rng = random.Random(seed)
        kinds = QUESTION_TYPES.get(family, QUESTION_TYPES["vipllava"])
        pictures = []
        for i in range(24):
            ex = make_example(rng, kinds[i % len(kinds)])
            buf = io.BytesIO()
            ex.images[0].save(buf, "PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            pictures.append((uri, ex.question, ex.images[0].width))
        prompts = [
            "Describe the picture in a few words, naming every shape, its colour and where it is.",
            "Count the shapes in the picture, then say which colour appears most often and where.",
            "A red star, a blue circle and a green square stand in a row. Which one is in the middle?",
            "Name three shapes and three colours that could appear in a picture of the shapes world.",
        ]
        return cls(pictures, prompts, body_limit)


def chat_body(uri: str, question: str, *, prompts: list[dict] | None = None, **fields: Any) -> dict:
    image: dict[str, Any] = {"url": uri}
    if prompts:
        image["visual_prompts"] = prompts
    content = [{"type": "image_url", "image_url": image}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], **fields}


def random_box(rng: random.Random, side: int) -> list[int]:
    x0, y0 = rng.randrange(0, side // 2), rng.randrange(0, side // 2)
    return [x0, y0, rng.randrange(x0 + 8, side), rng.randrange(y0 + 8, side)]


def fresh_prompt(rng: random.Random) -> str:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(24, 64)))
    return f"Spell this back: {word}"


# -- the clients --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    kinds: Counter = field(default_factory=Counter)  # requests per kind
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # route -> status -> n
    unexpected: Counter = field(default_factory=Counter)  # (kind, what happened) the kind should not give
    lost: Counter = field(default_factory=Counter)  # (kind, error) requests that got no answer
    greedy: dict[tuple, str] = field(default_factory=dict)  # request key -> first answer
    greedy_mismatches: list[dict] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # answered good requests, seconds

    def note(self, kind: str, route: str, status: int | str, expected: tuple[int | str, ...]) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[route][str(status)] += 1
            if status not in expected:
                self.unexpected[f"{kind}: {status}"] += 1

    def answer(self, key: tuple, text: str) -> None:
        with self.lock:
            first = self.greedy.setdefault(key, text)
            if first != text and len(self.greedy_mismatches) < 20:
                self.greedy_mismatches.append({"request": repr(key)[:200], "first": first, "now": text})


class Client:
    """One client thread's requests, each kind a method; `run` sends them at random until `stop`."""

    def __init__(
        self, base: str, port: int, material: Material, tally: Tally, weights: dict[str, float], seed: int
    ) -> None:
        self.base, self.port, self.m, self.tally, self.weights = base, port, material, tally, weights
        self.rng = random.Random(seed)
        self.http = httpx.Client(base_url=base, timeout=httpx.Timeout(120.0, connect=10.0))

    def run(self, stop: threading.Event) -> None:
        kinds, weights = zip(*self.weights.items(), strict=True)
        try:
            while not stop.is_set():
                kind = self.rng.choices(kinds, weights)[0]
                try:
                    getattr(self, kind)()
                except (httpx.TransportError, OSError) as e:
                    with self.tally.lock:
                        self.tally.kinds[kind] += 1
                        self.tally.lost[f"{kind}: {type(e).__name__}: {e}"[:200]] += 1
        finally:
            self.http.close()

    def post(self, kind: str, route: str, body: Any, expected: tuple[int, ...] = (200,)) -> httpx.Response:
        started = time.monotonic()
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = self.http.post(route, content=content, headers={"content-type": "application/json"})
        self.tally.note(kind, route, r.status_code, expected)
        if r.status_code == 200:
            with self.tally.lock:
                self.tally.latencies.append(time.monotonic() - started)
        return r

    # good, whole answers

    def chat_picture(self) -> None:
        uri, question, _ = self.rng.choice(self.m.pictures)
        r = self.post("chat_picture", CHAT, chat_body(uri, question, max_tokens=12, temperature=0))
        if r.status_code == 200:
            self.tally.answer((uri, question), r.json()["choices"][0]["message"]["content"])

    def chat_visual_prompt(self) -> None:
        uri, _, side = self.rng.choice(self.m.pictures)
        color = self.rng.choice(["red", "lime", "blue", "yellow"])
        shape = self.rng.choice(["rectangle", "ellipse"])
        spec = {"type": shape, "box": random_box(self.rng, side), "color": color}
        question = f"What shape is inside the {color} {shape}?"
        self.post("chat_visual_prompt", CHAT, chat_body(uri, question, prompts=[spec], max_tokens=8))

    def completion_repeated(self) -> None:
        prompt = self.rng.choice(self.m.prompts)
        r = self.post(
            "completion_repeated", COMPLETIONS, {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        )
        if r.status_code == 200:
            self.tally.answer((prompt,), r.json()["choices"][0]["text"])

    def completion_fresh(self) -> None:
        body = {"prompt": fresh_prompt(self.rng), "max_tokens": 16, "temperature": 0.8, "seed": 1}
        self.post("completion_fresh", COMPLETIONS, body)

    def models(self) -> None:
        r = self.http.get("/v1/models")
        self.tally.note("models", "/v1/models", r.status_code, (200,))

    # streams

    def stream(self, kind: str, route: str, body: dict, *, chunks: int | None = None) -> None:
        """Read a stream to its [DONE], or close it after `chunks` data lines."""
        with self.http.stream("POST", route, json={**body, "stream": True}) as r:
            seen, ending = 0, "no [DONE]"
            if r.status_code == 200:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    seen += 1
                    if line == "data: [DONE]" or (chunks is not None and seen >= chunks):
                        ending = "ok"
                        break
                    if line.startswith('data: {"error"'):
                        ending = "an error event: " + line[6:200]
                        break
            self.tally.note(kind, route, r.status_code, (200,))
            if r.status_code == 200 and ending != "ok":
                with self.tally.lock:
                    self.tally.unexpected[f"{kind}: 200 with {ending}"] += 1

    def stream_chat(self) -> None:
        uri, question, _ = self.rng.choice(self.m.pictures)
        self.stream("stream_chat", CHAT, chat_body(uri, question, max_tokens=16))

    def stream_completion(self) -> None:
        body = {"prompt": self.rng.choice(self.m.prompts), "max_tokens": 24}
        self.stream("stream_completion", COMPLETIONS, {**body, "stream_options": {"include_usage": True}})

    def cancelled_stream(self) -> None:
        """A long stream (its end token banned) closed after a few chunks; the server saw its 200 start."""
        body = {"prompt": fresh_prompt(self.rng), "max_tokens": 200, "logit_bias": {"2": -100}}
        self.stream("cancelled_stream", COMPLETIONS, body, chunks=self.rng.randint(1, 4))

    def abandoned(self) -> None:
        """A long non-streaming request whose socket closes before the answer (raw HTTP: no client library
        waits for it)."""
        self.send_and_close("abandoned", whole=True)

    def abandoned_mid_body(self) -> None:
        """A request whose socket closes before its body is complete (off by default; --weights)."""
        self.send_and_close("abandoned_mid_body", whole=False)

    def send_and_close(self, kind: str, *, whole: bool) -> None:
        route = self.rng.choice([CHAT, COMPLETIONS])
        if route == CHAT:
            uri, question, _ = self.rng.choice(self.m.pictures)
            ask = chat_body(uri, question, max_tokens=200, logit_bias={"2": -100})
        else:
            ask = {"prompt": fresh_prompt(self.rng), "max_tokens": 200, "logit_bias": {"2": -100}}
        body = json.dumps(ask).encode()
        head = (
            f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(head.encode() + (body if whole else body[: len(body) // 2]))
            time.sleep(self.rng.uniform(0.05, 0.6))
        self.tally.note(kind, route, ABANDONED, (ABANDONED,))

    # bad requests: each a 4xx, and the server keeps serving

    def bad_json(self) -> None:
        raw = self.rng.choice(
            [b'{"prompt": "hi", ', b'{"prompt": "hi"}}', b"\xff\xfe", b"[" * 200 + b"]" * 200]
        )
        self.post("bad_json", COMPLETIONS, raw, (400,))

    def unknown_field(self) -> None:
        body = {"prompt": "hi", "max_tokens": 2, self.rng.choice(["frobnicate", "tools", "best_of"]): 1}
        self.post("unknown_field", COMPLETIONS, body, (400,))

    def wrong_type(self) -> None:
        wrong = self.rng.choice([{"max_tokens": "ten"}, {"max_tokens": True}, {"n": "2"}, {"stream": "yes"}])
        self.post("wrong_type", COMPLETIONS, {"prompt": "hi", **wrong}, (400,))

    def huge_width(self) -> None:
        uri, _, _ = self.rng.choice(self.m.pictures)
        spec = {"type": "rectangle", "box": [10, 10, 60, 60], "width": self.rng.choice([10**6, 10**9, 1e300])}
        self.post("huge_width", CHAT, chat_body(uri, "What is inside?", prompts=[spec], max_tokens=4), (400,))

    def oversized(self) -> None:
        """A body over --max-body-bytes: with a Content-Length (refused before it is read) or chunked
        (counted as it streams in)."""
        size = self.m.body_limit + self.rng.randint(1, 4096)
        body = b'{"prompt": "' + b"a" * size + b'"}'
        if self.rng.random() < 0.5:
            self.post("oversized", COMPLETIONS, body, (413,))
            return

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        r = self.http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
        self.tally.note("oversized_chunked", COMPLETIONS, r.status_code, (413,))

    def unknown_path(self) -> None:
        r = self.http.get(f"/v1/no-such-route-{self.rng.randrange(10**9)}")
        self.tally.note("unknown_path", "unmatched", r.status_code, (404,))


KINDS = {  # kind (a Client method) -> weight
    "chat_picture": 6,
    "chat_visual_prompt": 4,
    "completion_repeated": 4,
    "completion_fresh": 3,
    "models": 1,
    "stream_chat": 3,
    "stream_completion": 3,
    "cancelled_stream": 2,
    "abandoned": 2,
    "abandoned_mid_body": 1,
    "bad_json": 1,
    "unknown_field": 1,
    "wrong_type": 1,
    "huge_width": 1,
    "oversized": 1,
    "unknown_path": 1,
}


# -- watching the server ------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def request_counts(text: str) -> dict[str, Counter]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            counts[m.group(1)][m.group(2)] += int(float(m.group(3)))
    return counts


def repeat(every: float, stop: threading.Event, work: Callable[[], None]) -> threading.Thread:
    """A thread calling `work` every `every` seconds (on a fixed schedule) until `stop`."""

    def loop() -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            work()
            next_at += every
            stop.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@dataclass
class Watch:
    """RSS and prefix-cache samples (t, rss, blocks, bytes) and /health latencies."""

    base: str
    pid: int
    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_failures: Counter = field(default_factory=Counter)

    def sample(self) -> None:
        rss = rss_bytes(self.pid)
        try:
            text = httpx.get(self.base + "/metrics", timeout=10).text
        except httpx.TransportError:
            return
        if rss is not None:
            blocks = int(gauge(text, "vlmkit_prefix_cache_blocks"))
            size = int(gauge(text, "vlmkit_prefix_cache_bytes"))
            self.samples.append((time.monotonic() - self.started, rss, blocks, size))

    def probe(self, http: httpx.Client) -> None:
        started = time.monotonic()
        try:
            r = http.get("/health")
            if r.status_code != 200:
                self.health_failures[str(r.status_code)] += 1
        except httpx.TransportError as e:
            self.health_failures[type(e).__name__] += 1
        self.health.append(time.monotonic() - started)


# -- the run ------------------------------------------------------------------------------------


def settle(base: str, expected_total: int, timeout: float) -> dict[str, Counter]:
    """The server's request counts once every request has ended there (its count reaches the clients') and
    nothing runs or waits, or when `timeout` is up."""
    deadline = time.monotonic() + timeout
    while True:
        counts = request_counts(httpx.get(base + "/metrics", timeout=10).text)
        health = httpx.get(base + "/health", timeout=10).json()
        total = sum(sum(c.values()) for c in counts.values())
        idle = health.get("running") == 0 and health.get("waiting") == 0
        if (total >= expected_total and idle) or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def reconcile(client: dict[str, Counter], server: dict[str, Counter]) -> tuple[list[str], dict[str, dict]]:
    """Mismatches between the clients' tally and the server's counts (empty: reconciled), and per route how
    the abandoned requests ended on the server."""
    problems, abandoned = [], {}
    for route in sorted(set(client) | set(server)):
        mine, theirs = client.get(route, Counter()), server.get(route, Counter())
        for status in sorted((set(mine) | set(theirs)) - {ABANDONED, "200", "499"}):
            if mine[status] != theirs[status]:
                problems.append(
                    f"{route} {status}: clients saw {mine[status]}, server counted {theirs[status]}"
                )
        left = mine[ABANDONED]
        ok_or_gone = mine["200"] + mine["499"] + left
        if (
            theirs["200"] + theirs["499"] != ok_or_gone
            or theirs["200"] < mine["200"]
            or theirs["499"] < mine["499"]
        ):
            problems.append(
                f"{route}: clients saw {mine['200']} x 200 and {mine['499']} x 499 and abandoned {left}; server "
                f"counted {theirs['200']} x 200 and {theirs['499']} x 499"
            )
        if left:
            abandoned[route] = {
                "sent": left,
                "server_499": theirs["499"] - mine["499"],
                "server_200": theirs["200"] - mine["200"],
            }
    return problems, abandoned


def mean_over(samples: list[tuple[float, int, int, int]], start: float, end: float) -> tuple[float, float]:
    """Mean RSS and mean RSS less the prefix cache over the samples taken in [start, end]."""
    picked = [s for s in samples if start <= s[0] <= end] or samples[-1:]
    return statistics.fmean(s[1] for s in picked), statistics.fmean(s[1] - s[3] for s in picked)


def soak(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Run the server under the traffic for args.duration seconds; the report (its "failures" empty when
    every property held)."""
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(args.log or tempfile.mkstemp(prefix="vlmkit-soak-", suffix=".log")[1])
    family = "idefics" if "idefics" in args.model else "vipllava"
    material = Material.make(family, args.max_body_bytes, args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    serve_args = ["--model", args.model, "--max-body-bytes", str(args.max_body_bytes), *extra]
    proc = start_serve(serve_args, port=port, log=log, env=env, timeout=args.startup_timeout)
    tally, stop, stop_watch = Tally(), threading.Event(), threading.Event()
    try:
        watch = Watch(base, proc.pid)
        watch.sample()
        prober = httpx.Client(base_url=base, timeout=5.0)
        watchers = [
            repeat(1.0, stop_watch, watch.sample),
            repeat(0.25, stop_watch, lambda: watch.probe(prober)),
        ]
        clients = [
            Client(base, port, material, tally, args.weights, args.seed * 1000 + i)
            for i in range(args.clients)
        ]
        threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        traffic_started = time.monotonic() - watch.started
        while time.monotonic() - watch.started < traffic_started + args.duration and proc.poll() is None:
            time.sleep(0.5)
        traffic_ended = time.monotonic() - watch.started
        stop.set()
        for t in threads:
            t.join(150)
        if proc.poll() is None:
            expected = sum(sum(c.values()) for c in tally.statuses.values())
            server_counts = settle(base, expected, timeout=30)
            watch.sample()
        else:
            server_counts = {}
        stop_watch.set()
        for t in watchers:
            t.join(10)
        prober.close()
    finally:
        stop.set()
        stop_watch.set()
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()

    run = Run(tally, watch, server_counts, alive, code, log, traffic_started, traffic_ended)
    return assess(args, extra, run)


@dataclass
class Run:
    """What a soak gathered: the clients' tally, the samples, the server's final counts and its end."""

    tally: Tally
    watch: Watch
    server_counts: dict[str, Counter]
    alive: bool  # the server was still running at the end of the run
    code: int  # the server's exit status
    log: Path
    traffic_started: float  # seconds since the watch started
    traffic_ended: float


def assess(args: argparse.Namespace, extra: list[str], run: Run) -> dict[str, Any]:
    """The report of a run, with the properties that failed in "failures"."""
    tally, watch, log = run.tally, run.watch, run.log
    traffic_started, traffic_ended = run.traffic_started, run.traffic_ended
    failures: list[str] = []
    if not run.alive:
        failures.append(f"the server died during the run (exit status {run.code}); log: {log}")
    samples = watch.samples
    warm = traffic_started + args.warmup
    after = [s for s in samples if warm <= s[0] <= traffic_ended]
    window = max(2.0, min(10.0, (traffic_ended - warm) / 4))
    rss_warm, net_warm = mean_over(samples, warm, warm + window)
    rss_end, net_end = mean_over(samples, traffic_ended - window, traffic_ended)
    drift = 100 * (net_end - net_warm) / net_warm
    if abs(drift) > DRIFT_LIMIT_PCT:
        failures.append(f"RSS less the prefix cache drifted {drift:+.1f}% after the warm-up (limit +-5%)")
    warm_sample = after[0] if after else samples[-1]
    end_sample = [s for s in samples if s[0] <= traffic_ended][-1]
    mb = 2**20

    statuses = {route: dict(sorted(c.items())) for route, c in sorted(tally.statuses.items())}
    server = {route: dict(sorted(c.items())) for route, c in sorted(run.server_counts.items())}
    fives = {f"{r} {s}": n for r, c in server.items() for s, n in c.items() if s.startswith("5")}
    fives |= {f"{r} {s} (client)": n for r, c in statuses.items() for s, n in c.items() if s.startswith("5")}
    if fives:
        failures.append(f"5xx answers: {fives}")
    problems, abandoned = reconcile(tally.statuses, run.server_counts) if run.alive else (["server died"], {})
    if problems:
        failures.append("metrics not reconciled: " + "; ".join(problems))
    if tally.lost:
        failures.append(f"{sum(tally.lost.values())} request(s) got no answer: {dict(tally.lost)}")
    if tally.unexpected:
        failures.append(f"answers of the wrong kind: {dict(tally.unexpected)}")
    if tally.greedy_mismatches:
        failures.append(f"{len(tally.greedy_mismatches)} greedy answer(s) changed between identical requests")
    worst = max(watch.health, default=float("inf"))
    if worst >= HEALTH_LIMIT_S or watch.health_failures:
        failures.append(f"/health: worst {worst:.3f} s (limit 1 s), failures {dict(watch.health_failures)}")
    log_text = log.read_text(errors="replace")
    latencies = sorted(tally.latencies)
    return {
        "model": args.model,
        "serve_flags": ["--max-body-bytes", str(args.max_body_bytes), *extra],
        "duration_s": round(traffic_ended - traffic_started, 1),
        "warmup_s": args.warmup,
        "clients": args.clients,
        "requests": dict(sorted(tally.kinds.items())),
        "requests_total": sum(tally.kinds.values()),
        "good_latency_s": {
            "p50": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "p99": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
        },
        "client_statuses": statuses,
        "server_statuses": server,
        "abandoned": abandoned,
        "reconciled": not problems,
        "rss_mb": {
            "start": round(samples[0][1] / mb, 1),
            "after_warmup": round(warm_sample[1] / mb, 1),
            "end": round(end_sample[1] / mb, 1),
            "min_after_warmup": round(min(s[1] for s in after) / mb, 1) if after else None,
            "max_after_warmup": round(max(s[1] for s in after) / mb, 1) if after else None,
        },
        "prefix_cache": {
            "blocks_after_warmup": warm_sample[2],
            "blocks_end": end_sample[2],
            "mb_after_warmup": round(warm_sample[3] / mb, 1),
            "mb_end": round(end_sample[3] / mb, 1),
            "share_of_rss_end_pct": round(100 * end_sample[3] / end_sample[1], 1),
        },
        "rss_less_prefix_cache_mb": {"after_warmup": round(net_warm / mb, 1), "end": round(net_end / mb, 1)},
        "rss_drift_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
        "rss_drift_pct_excluding_prefix_cache": round(drift, 2),
        "health": {
            "probes": len(watch.health),
            "worst_s": round(worst, 3),
            "p99_s": round(sorted(watch.health)[int(len(watch.health) * 0.99)], 3) if watch.health else None,
            "failures": dict(watch.health_failures),
        },
        "greedy": {"requests_checked": len(tally.greedy), "changed": tally.greedy_mismatches},
        "server_exit_status": run.code,
        "server_log": str(log),
        "server_log_tracebacks": log_text.count("Traceback (most recent call last)"),
        "failures": failures,
        "samples": [[round(t, 2), rss, blocks, size] for t, rss, blocks, size in samples],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_report(r: dict[str, Any]) -> None:
    print(f"soak of {r['model']} ({' '.join(r['serve_flags'])}): {r['duration_s']} s, {r['clients']} clients")
    print(f"  requests: {r['requests_total']}  " + "  ".join(f"{k} {n}" for k, n in r["requests"].items()))
    print(f"  good-request latency: p50 {r['good_latency_s']['p50']} s, p99 {r['good_latency_s']['p99']} s")
    for route, counts in r["client_statuses"].items():
        server = r["server_statuses"].get(route, {})
        print(f"  {route}: clients {counts}  server {server}")
    for route, a in r["abandoned"].items():
        print(
            f"  abandoned on {route}: {a['sent']} sent, server 499 x {a['server_499']}, 200 x {a['server_200']}"
        )
    m, p = r["rss_mb"], r["prefix_cache"]
    print(
        f"  RSS MB: start {m['start']}, after warm-up ({r['warmup_s']:g} s) {m['after_warmup']}, end {m['end']}; "
        f"after warm-up min {m['min_after_warmup']} max {m['max_after_warmup']}"
    )
    print(
        f"  prefix cache: {p['blocks_after_warmup']} -> {p['blocks_end']} blocks, {p['mb_after_warmup']} -> "
        f"{p['mb_end']} MB ({p['share_of_rss_end_pct']}% of RSS at the end)"
    )
    net = r["rss_less_prefix_cache_mb"]
    print(
        f"  RSS drift after warm-up: {r['rss_drift_pct']:+.2f}% raw, "
        f"{r['rss_drift_pct_excluding_prefix_cache']:+.2f}% less the prefix cache ({net['after_warmup']} -> "
        f"{net['end']} MB)"
    )
    h = r["health"]
    print(
        f"  /health: {h['probes']} probes, worst {h['worst_s']} s, p99 {h['p99_s']} s, failures {h['failures']}"
    )
    print(
        f"  greedy answers checked: {r['greedy']['requests_checked']}, changed: {len(r['greedy']['changed'])}"
    )
    print(f"  metrics reconciled: {r['reconciled']}")
    print(
        f"  server exit status {r['server_exit_status']}, log {r['server_log']} ({r['server_log_tracebacks']} tracebacks)"
    )
    print("PASS" if not r["failures"] else "FAIL:\n  " + "\n  ".join(r["failures"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="other flags go to vlmkit serve"
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default 120)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before RSS must stay flat (default 20%% of --duration, >= 30 s)"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--max-body-bytes", type=int, default=256 * 1024, help="the server's body limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--log", help="the server's log file (default: a temporary file)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="KIND=N",
        help=f"change how often a kind of request is sent (kinds and default weights: {KINDS})",
    )
    args, extra = parser.parse_known_args(argv)
    weights = dict(KINDS)
    for pair in args.weights:
        kind, _, n = pair.partition("=")
        if kind not in KINDS or not n.replace(".", "", 1).isdigit():
            parser.error(f"--weights takes KIND=N with a kind of {sorted(KINDS)} and N >= 0, got {pair!r}")
        weights[kind] = float(n)
    if not any(weights.values()):
        parser.error("--weights leaves no kind of request to send")
    args.weights = weights
    if args.warmup is None:
        args.warmup = min(max(30.0, 0.2 * args.duration), 0.5 * args.duration)
    if not 0 <= args.warmup < args.duration:
        parser.error(f"--warmup must be in [0, --duration), got {args.warmup:g}")
    report = soak(args, extra)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
