"""Fuzz a running `vlmkit serve` through its HTTP API and check the properties of issue 18:

- no 5xx, whatever the request;
- no request takes longer than its deadline (the server's --timeout, plus a margin);
- /health answers within 1 s throughout (polled from its own thread);
- each request ends exactly once: one HTTP answer each, a stream ends with exactly one of [DONE] or an
  error event and every choice finishes once, and /metrics counts as many /v1/ requests as were sent;
- a known-good greedy request gives the same answer before and after.

Requests come from two sources: schemathesis, generating positive and negative bodies for every operation
of the server's OpenAPI schema, and vlmkit's own hypothesis strategies (fuzz/strategies.py) for chat
messages with pictures (well-formed and malformed) and visual prompts.

    python fuzz/campaign.py --requests 10000                 # starts `vlmkit serve --model demo` itself
    python fuzz/campaign.py --url http://127.0.0.1:8000 --requests 2000

tests/test_fuzz.py runs a short campaign in CI; fuzz/README.md has how to run long ones and their figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from strategies import messages  # noqa: E402

from vlmkit.serve.launch import start_serve  # noqa: E402

KNOWN = {"prompt": "Describe the picture.", "max_tokens": 12, "temperature": 0}
SERVER_ARGS = ["--max-seq-len", "256", "--max-tokens-default", "16", "--timeout", "20", "--max-batch", "8"]


@dataclass
class Report:
    requests: int = 0
    v1_requests: int = 0  # those /metrics counts
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    health_worst_s: float = 0.0
    health_polls: int = 0
    metrics_counted: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class Health(threading.Thread):
    """Polls /health every `every` seconds and keeps the worst answer time (a failure counts as 60 s)."""

    def __init__(self, url: str, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.worst, self.polls = 0.0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.monotonic() - started if ok else 60.0
                self.worst, self.polls = max(self.worst, took), self.polls + 1
                self.stop.wait(self.every)


def check_stream(text: str) -> str | None:
    """What is wrong with a server-sent event stream's ending, or None."""
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not data:
        return "an empty stream"
    if data[-1] != "[DONE]":
        last = json.loads(data[-1])
        if "error" not in last:
            return f"the stream ended with neither [DONE] nor an error event: {data[-1][:200]}"
        if any("error" in json.loads(d) for d in data[:-1]):
            return "more than one error event"
        return None
    finishes: dict[int, int] = {}
    for d in data[:-1]:
        chunk = json.loads(d)
        if "error" in chunk:
            return "an error event followed by [DONE]"
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason") is not None:
                finishes[choice["index"]] = finishes.get(choice["index"], 0) + 1
    if any(count != 1 for count in finishes.values()) or not finishes:
        return f"choices finished {finishes} times"
    return None


def metrics_total(url: str, headers: dict[str, str]) -> int:
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    return int(sum(float(v) for v in re.findall(r"^vlmkit_requests_total\{[^}]*\} (\S+)$", text, re.M)))


class Campaign:
    def __init__(
        self, url: str, *, deadline: float, api_key: str | None = None, keep: Path | None = None
    ) -> None:
        self.url, self.deadline, self.keep = url, deadline, keep
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=deadline + 30, headers=self.headers)
        self.report = Report()

    def send(self, method: str, path: str, **kwargs: Any) -> None:
        started = time.monotonic()
        try:
            r = self.client.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as e:
            self.report.failures.append(f"{method} {path}: no answer ({e!r})")
            return
        took = time.monotonic() - started
        rep = self.report
        rep.requests += 1
        rep.v1_requests += path.startswith("/v1/")
        rep.statuses[str(r.status_code)] = rep.statuses.get(str(r.status_code), 0) + 1
        rep.slowest_s = max(rep.slowest_s, took)
        body = kwargs.get("content") or json.dumps(kwargs.get("json"))[:300]
        if (r.status_code >= 500 or took > self.deadline) and self.keep is not None:
            whole = kwargs.get("content") or json.dumps(kwargs.get("json")).encode()
            with self.keep.open("a") as f:  # each failing request whole, to replay it
                f.write(
                    json.dumps(
                        {
                            "method": method,
                            "path": path,
                            "status": r.status_code,
                            "body": whole.decode("utf-8", "replace"),
                        }
                    )
                    + "\n"
                )
        if r.status_code >= 500:
            rep.failures.append(f"{method} {path} -> {r.status_code} {r.text[:300]} for {str(body)[:300]}")
        if took > self.deadline:
            rep.failures.append(
                f"{method} {path} took {took:.1f} s > {self.deadline} s for {str(body)[:300]}"
            )
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
            wrong = check_stream(r.text)
            if wrong:
                rep.failures.append(f"{method} {path}: {wrong} for {str(body)[:300]}")

    def known_answer(self) -> str:
        r = self.client.post(self.url + "/v1/completions", json=KNOWN)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    def schemathesis(self, examples: int, seed: int) -> None:
        """Bodies from the server's OpenAPI schema: valid ones (positive) and ones that break it (negative),
        for every operation."""
        import schemathesis
        from schemathesis.core import NOT_SET
        from schemathesis.generation.modes import GenerationMode

        schema = schemathesis.openapi.from_url(self.url + "/openapi.json", headers=self.headers)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = schema.as_strategy(generation_mode=mode)

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: Any) -> None:
                kwargs: dict[str, Any] = {"params": case.query or None}
                headers = {k: str(v) for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                if isinstance(case.body, bytes):  # negative cases may send raw bytes
                    kwargs["content"] = case.body
                elif case.body is not NOT_SET:  # NaN and Infinity go out as written: the server refuses them
                    kwargs["content"] = json.dumps(case.body).encode()
                    headers["content-type"] = case.media_type or "application/json"
                kwargs["headers"] = headers or None
                self.send(case.method, case.formatted_path, **kwargs)

            seed_of(run, seed)()

    def messages(self, examples: int, seed: int) -> None:
        """Chat requests whose messages carry pictures (good and malformed) and visual prompts."""

        @settings(
            max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(conversation=messages(), stream=st.booleans(), n=st.integers(1, 2))
        def run(conversation: list[dict[str, Any]], stream: bool, n: int) -> None:
            body = {"messages": conversation, "max_tokens": 8, "stream": stream, "n": n}
            self.send("POST", "/v1/chat/completions", json=body)

        seed_of(run, seed)()


def seed_of(test: Any, seed: int) -> Any:
    from hypothesis import seed as hypothesis_seed

    return hypothesis_seed(seed)(test)


def run_campaign(
    url: str,
    *,
    requests: int,
    seed: int = 0,
    deadline: float = 22.0,
    api_key: str | None = None,
    keep: Path | None = None,
) -> Report:
    """About `requests` requests against the server at `url` (half from the schema, half from the
    message strategies), with the properties checked; the report's `failures` lists what broke, and
    `keep` (a JSONL file) gets each failing request whole."""
    started = time.monotonic()
    campaign = Campaign(url, deadline=deadline, api_key=api_key, keep=keep)
    health = Health(url)
    health.start()
    before_metrics = metrics_total(url, campaign.headers)
    before = campaign.known_answer()
    per_mode = max(1, requests // 4)
    try:
        campaign.schemathesis(per_mode, seed)
        campaign.messages(max(1, requests - 2 * per_mode), seed)
    finally:
        health.stop.set()
        health.join(5)
    rep = campaign.report
    after = campaign.known_answer()
    if after != before:
        rep.failures.append(
            f"the known-good request answered {after!r} after the campaign, {before!r} before"
        )
    rep.metrics_counted = metrics_total(url, campaign.headers) - before_metrics - 2  # less the known-good two
    if rep.metrics_counted != rep.v1_requests:
        rep.failures.append(
            f"/metrics counted {rep.metrics_counted} /v1/ requests; {rep.v1_requests} were sent"
        )
    rep.health_worst_s, rep.health_polls = health.worst, health.polls
    if health.worst > 1.0:
        rep.failures.append(f"/health took {health.worst:.2f} s at worst (limit 1 s)")
    rep.seconds = time.monotonic() - started
    return rep


def start_server(model: str, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    """`vlmkit serve` on `port`, its output going to the file `log`, once it answers /health."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return start_serve(["--model", model, *SERVER_ARGS, *extra], port=port, log=log, env=env, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start `vlmkit serve` here)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--server-log", default="fuzz-server.log", help="the started server's output")
    parser.add_argument("--failures", default="fuzz-failures.jsonl", help="failing requests, whole, go here")
    args = parser.parse_args()
    proc = None
    url = args.url
    log = Path(args.server_log)
    if url is None:
        key = ["--api-key", args.api_key] if args.api_key else []
        proc = start_server(args.model, args.port, key, log)
        url = f"http://127.0.0.1:{args.port}"
    try:
        keep = Path(args.failures)
        report = run_campaign(url, requests=args.requests, seed=args.seed, api_key=args.api_key, keep=keep)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
            text = log.read_text()
            print(f"server log {log}: {len(text.splitlines())} lines, {text.count('Traceback')} tracebacks")
    print(json.dumps({**asdict(report), "failures": report.failures[:20]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
