"""The engine under random interleavings of submit, cancel (often while still waiting), disconnect (after
tokens arrived), n > 1, greedy and seeded sampling, and prompts that share prefixes (prefix-cache hits) or
pictures (feature-cache hits), for each built-in family. Invariants after every script:

- every choice of every request ends exactly once, and the request is marked done;
- the rows, the waiting queue and every per-prompt table of the executor are empty again (all returned);
- the prefix and feature caches are within their capacities, and no prefix block is still pinned;
- each request that was not cancelled answered exactly as it does alone on an idle engine.

The engine has no beam search (the OpenAI API has none; beams run through `generate`), so beams are not
part of the interleavings. The prefix cache copies blocks into rows; its reference counts are the pins of
blocks that planned prompts will copy, which must all return to zero.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vlmkit
from vlmkit.serve.engine import Engine, Event, Request, SamplingParams

PROMPTS = [  # two pairs sharing long starts (prefix-cache blocks are 16 tokens)
    "Look at the picture carefully and tell me which shapes you can see in it, one by one.",
    "Look at the picture carefully and tell me which shapes you can see in it, with colours.",
    "Describe the picture.",
    "Describe the picture in a few words, please, and mention the largest shape first.",
]
PICTURES = [Image.new("RGB", (64, 64), colour) for colour in ("white", (250, 240, 200))]


@dataclass(frozen=True)
class Spec:
    prompt: int
    picture: int | None
    n: int
    max_tokens: int
    seed: int | None  # None: greedy

    def params(self) -> SamplingParams:
        sampled = self.seed is not None
        return SamplingParams(
            max_tokens=self.max_tokens, n=self.n, temperature=0.8 if sampled else 0.0, seed=self.seed
        )


@dataclass
class Tracked:
    spec: Spec
    request: Request
    events: list[Event] = field(default_factory=list)
    cancelled: bool = False
    first: threading.Event = field(default_factory=threading.Event)


specs = st.builds(
    Spec,
    prompt=st.integers(0, len(PROMPTS) - 1),
    picture=st.sampled_from([None, 0, 1]),
    n=st.integers(1, 3),
    max_tokens=st.integers(1, 10),
    seed=st.sampled_from([None, None, 7, 11]),
)
operations = st.one_of(
    st.tuples(st.just("submit"), specs),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("disconnect"), st.integers(0, 50)),
    st.tuples(st.just("pause"), st.integers(0, 15)),
)


def inputs(vlm: vlmkit.VLM, spec: Spec) -> dict:
    if spec.picture is None:
        return vlm.inputs(PROMPTS[spec.prompt])
    return vlm.inputs("<image>\n" + PROMPTS[spec.prompt], [PICTURES[spec.picture]])


def submit(engine: Engine, vlm: vlmkit.VLM, spec: Spec) -> Tracked:
    holder: list[Tracked] = []

    def emit(ev: Event) -> None:
        holder[0].events.append(ev)
        holder[0].first.set()

    request = Request(inputs=inputs(vlm, spec), params=spec.params(), emit=emit)
    holder.append(Tracked(spec, request))
    engine.submit(request)
    return holder[0]


def answers(tracked: Tracked) -> list[str]:
    texts = [""] * tracked.spec.n
    for ev in tracked.events:
        if ev.finish_reason is None:
            texts[ev.index] += ev.text
    return texts


class Family:
    """One built-in model, its engine, and the answers of requests run alone (computed once each)."""

    def __init__(self, name: str) -> None:
        self.vlm = vlmkit.VLM.load(name)
        self.engine = Engine(  # a small prefix cache: evictions (and pins that must stop them) are frequent
            self.vlm.model,
            self.vlm.tokenizer,
            max_batch=6,
            max_seq_len=512,
            max_queue=64,
            prefix_cache_mb=0.3,
        ).start()
        self.alone: dict[Spec, list[str]] = {}

    def answer_alone(self, spec: Spec) -> list[str]:
        if spec not in self.alone:
            solo = Engine(self.vlm.model, self.vlm.tokenizer, max_batch=6, max_seq_len=512, prefix_cache_mb=0)
            solo.start()
            try:
                tracked = submit(solo, self.vlm, spec)
                assert tracked.request.done.wait(60)
            finally:
                solo.stop(10)
            self.alone[spec] = answers(tracked)
        return self.alone[spec]


@pytest.fixture(scope="module", params=["demo", "demo-idefics"])
def family(request):
    f = Family(request.param)
    yield f
    f.engine.stop(10)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(script=st.lists(operations, min_size=1, max_size=20))
def test_random_interleavings_keep_the_engine_whole(family, script):
    engine, vlm = family.engine, family.vlm
    tracked: list[Tracked] = []
    for op, arg in script:
        if op == "submit":
            tracked.append(submit(engine, vlm, arg))
        elif op == "cancel" and tracked:
            t = tracked[arg % len(tracked)]
            t.cancelled = True
            t.request.cancel()
        elif op == "disconnect" and tracked:
            t = tracked[arg % len(tracked)]
            t.first.wait(30)  # a client that read some tokens, then went away
            t.cancelled = True
            t.request.cancel()
        elif op == "pause":
            time.sleep(arg / 1000)
    for t in tracked:
        assert t.request.done.wait(60), "a request never ended"
    deadline = time.monotonic() + 10
    while (engine.scheduler.rows or engine.executor.prompts) and time.monotonic() < deadline:
        time.sleep(0.01)  # done is set as the last row ends; the step that ended it then compacts

    for t in tracked:
        ends = [ev for ev in t.events if ev.finish_reason is not None]
        assert sorted(ev.index for ev in ends) == list(range(t.spec.n)), ends  # each choice ends once
        assert all(ev.finish_reason != "error" for ev in ends), [ev.error for ev in ends]
        if not t.cancelled:
            assert {ev.finish_reason for ev in ends} <= {"stop", "length"}
            assert answers(t) == family.answer_alone(t.spec), t.spec
    assert not engine.scheduler.rows and engine.scheduler.waiting.empty()
    assert not engine.executor.prompts and not engine.executor.prompt_adapters
    assert len(engine.prefix.items) <= engine.prefix.capacity and not engine.prefix.pins  # pins back to 0
    assert len(engine.features.items) <= max(engine.features.size, 0)
    assert engine.error is None
