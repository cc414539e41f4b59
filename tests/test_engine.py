"""The continuous-batching engine on tiny random models: rows of different lengths, images and none, joining
and leaving between steps, all equal to single-request greedy output; sampling by seed; the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import build_idefics_checkpoint, build_llava_checkpoint
from PIL import Image

import vlmkit
from vlmkit.serve.engine import Engine, QueueFull, Request, SamplingParams


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["llava", "idefics"])
def vlm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        build_llava_checkpoint(folder)
    else:
        build_idefics_checkpoint(folder)
    return vlmkit.VLM.load(folder)


def run_all(engine: Engine, jobs: list[tuple[dict, SamplingParams]]) -> list[list[str]]:
    """Submit the jobs a few at a time (later ones join a running batch); the text of each choice."""
    texts = [[""] * p.n for _, p in jobs]
    reasons = [[None] * p.n for _, p in jobs]
    requests = []
    for i, (inputs, params) in enumerate(jobs):

        def emit(ev, i=i):
            if ev.finish_reason is None:
                texts[i][ev.index] += ev.text
            else:
                reasons[i][ev.index] = ev.finish_reason

        requests.append(Request(inputs=inputs, params=params, emit=emit))
        engine.submit(requests[-1])
        if i % 3 == 2:
            assert requests[-1].done.wait(60)
    for r in requests:
        assert r.done.wait(60)
    assert all(x in ("stop", "length") for row in reasons for x in row), reasons
    return texts


def test_mixed_batch_equals_single_requests(vlm):
    prompts = [
        ("Describe this.", [picture(0)]),
        ("What is it? Tell me more, please, in many words.", [picture(1)]),
        ("Hello", []),  # text only
        ("Compare", [picture(2), picture(3)]),
        ("Again", [picture(0)]),  # a repeated picture: features from the cache
        ("Short", []),
    ]
    lengths = [5, 12, 9, 7, 3, 10]
    want = [
        vlm.generate(p, images=ims, max_new_tokens=n) for (p, ims), n in zip(prompts, lengths, strict=True)
    ]
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=4, max_seq_len=256).start()
    try:
        jobs = [
            (vlm.inputs(p, ims), SamplingParams(max_tokens=n))
            for (p, ims), n in zip(prompts, lengths, strict=True)
        ]
        got = run_all(engine, jobs)
    finally:
        engine.stop(10)
    assert [g[0] for g in got] == want
    assert engine.features.hits >= 1 and engine.steps < sum(lengths)


def test_sampling_is_reproducible_by_seed(vlm):
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=6, max_seq_len=128).start()
    try:
        inputs = vlm.inputs("Describe this.", [picture(5)])
        params = dict(max_tokens=8, temperature=1.3, n=3)
        a, b, c = run_all(
            engine,
            [
                (inputs, SamplingParams(**params, seed=1)),
                (inputs, SamplingParams(**params, seed=1)),
                (inputs, SamplingParams(**params, seed=2)),
            ],
        )
    finally:
        engine.stop(10)
    assert a == b and a != c and len(set(a)) > 1


def test_bad_requests_are_refused_before_they_queue(vlm):
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=2, max_seq_len=64, max_queue=1)
    inputs = vlm.inputs("Hello")
    with pytest.raises(ValueError, match="exceeds this server's limit of 64 tokens"):
        engine.submit(Request(inputs=inputs, params=SamplingParams(max_tokens=100), emit=print))
    with pytest.raises(ValueError, match="n must be between 1 and 2"):
        engine.submit(Request(inputs=inputs, params=SamplingParams(n=3), emit=print))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request(inputs=inputs, params=SamplingParams(top_p=0.0), emit=print))
    engine.submit(Request(inputs=inputs, params=SamplingParams(max_tokens=2), emit=print))
    with pytest.raises(QueueFull):
        engine.submit(Request(inputs=inputs, params=SamplingParams(max_tokens=2), emit=print))
    assert engine.queue_depth == 1 and engine.running == 0
    with pytest.raises(TypeError, match="serves"):
        Engine(torch.nn.Linear(2, 2), vlm.tokenizer)
