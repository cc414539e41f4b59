"""The continuous-batching engine on tiny random models: rows of different lengths, images and none, joining
and leaving between steps, all equal to single-request greedy output; sampling by seed; the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import build_idefics_checkpoint, build_llava_checkpoint
from PIL import Image

import vlmkit
from vlmkit.serve.engine import Engine, PrefixCache, QueueFull, Request, SamplingParams
from vlmkit.serve.errors import InvalidRequest
from vlmkit.vipllava.model import VipLlavaModel


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


def run_one(engine: Engine, inputs: dict, max_tokens: int) -> tuple[str, int]:
    """One request alone: its text and the prompt tokens it took from the prefix cache."""
    before = engine.prefix.hit_tokens
    text = run_all(engine, [(inputs, SamplingParams(max_tokens=max_tokens))])[0][0]
    return text, engine.prefix.hit_tokens - before


def test_prefix_cache_reuses_blocks_and_keeps_outputs(vlm):
    """Prompts that start like an earlier one (same picture, same words) run only their new blocks and
    answer exactly as a single request does; the same words after another picture reuse nothing."""
    pic, other = picture(10), picture(11)
    prompts = [
        ("Describe this picture in detail.", [pic]),
        ("Describe this picture briefly, please.", [pic]),
        ("Describe this picture in detail.", [pic]),
        ("Describe this picture in detail.", [other]),
    ]
    want = [vlm.generate(p, images=ims, max_new_tokens=6) for p, ims in prompts]
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=4, max_seq_len=256, prefix_block=4).start()
    try:
        got, reused = [], []
        for i, (p, ims) in enumerate(prompts):
            misses = engine.features.misses + engine.features.hits
            text, hit = run_one(engine, vlm.inputs(p, ims), 6)
            got.append(text)
            reused.append(hit)
            if i == 2 and isinstance(
                vlm.model, VipLlavaModel
            ):  # every picture token was cached: no features needed at all
                assert engine.features.misses + engine.features.hits == misses
    finally:
        engine.stop(10)
    assert got == want
    L = vlm.inputs(prompts[2][0], prompts[2][1])["input_ids"].shape[1]
    assert reused[0] == 0 and reused[1] > 0
    assert reused[2] == (L - 1) // 4 * 4  # everything but the block of the last token
    assert reused[3] == 0  # the picture's tokens sit in the first block


def test_a_follow_up_turn_reuses_the_answer_too(vlm):
    """A second turn whose prompt repeats the first prompt and its answer takes both from the cache."""
    first = vlm.inputs("What is this?", [picture(12)])
    eos = Engine(vlm.model, vlm.tokenizer).eos
    with torch.inference_mode():
        out = vlm.model.generate(**first, max_new_tokens=7, do_sample=False, eos_token_id=eos)
    assert not set(out[0, -7:].tolist()) & set(eos)  # the random model answers at full length
    more = torch.tensor([vlm.tokenizer.encode(" And then?", add_special_tokens=False)])
    ids = torch.cat([out, more], dim=1)
    second = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    second.update({k: v for k, v in first.items() if k not in second})
    if "image_attention_mask" in first:  # the new tokens attend to the picture the answer attends to
        iam = first["image_attention_mask"]
        extra = ids.shape[1] - iam.shape[1]
        second["image_attention_mask"] = torch.cat([iam, iam[:, -1:].expand(-1, extra, -1)], dim=1)
    with torch.inference_mode():
        want = vlm.model.generate(**second, max_new_tokens=5, do_sample=False, eos_token_id=eos)
    want_text = vlm.tokenizer.decode(want[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=2, max_seq_len=256, prefix_block=4).start()
    try:
        run_one(engine, first, 7)
        text, reused = run_one(engine, second, 5)
    finally:
        engine.stop(10)
    L = first["input_ids"].shape[1]
    assert reused > L // 4 * 4  # blocks of the answer (6 of its 7 tokens ran through the model) too
    assert reused == (L + 6) // 4 * 4
    assert text == want_text


def test_prefix_cache_evicts_deep_blocks_first():
    cache = PrefixCache(capacity=3, block=2)
    chain = cache.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], {})
    assert len(chain) == 4 and len(set(chain)) == 4
    assert cache.hashes([1, 2, 3, 4], {1: b"picture"})[1] != chain[1]  # marks change the hash
    assert cache.hashes([1, 2, 3, 4], {})[:2] == chain[:2]
    cache.put(chain, lambda b: torch.full((1, 2), float(b)))
    assert len(cache.items) == 3
    assert [float(t[0, 0]) for t in cache.match(chain)] == [0.0, 1.0, 2.0]  # the deep end went
    other = cache.hashes([9, 9, 9, 9], {})
    cache.put(other, lambda b: torch.zeros(1, 2))  # two new blocks push out the old chain's deep end
    assert [float(t[0, 0]) for t in cache.match(chain)] == [0.0]
    assert len(cache.match(other)) == 2
    assert PrefixCache(capacity=0, block=2).match(chain) == []
    # a planned prompt pins the blocks it will copy: they outlive any number of newer blocks, and the pins
    # return to zero; with every slot pinned, new blocks are simply not kept
    cache.pin(chain[:1])
    for k in range(5):
        cache.put(cache.hashes([k, k, k, k], {5: b"x"}), lambda b: torch.full((1, 2), 7.0))
    assert [float(t[0, 0]) for t in cache.match(chain)] == [0.0] and cache.pins
    full = PrefixCache(capacity=1, block=2)
    full.put(chain[:1], lambda b: torch.zeros(1, 2))
    full.pin(chain[:1])
    full.put(other[:1], lambda b: torch.ones(1, 2))
    assert full.match(other) == [] and len(full.match(chain)) == 1
    cache.unpin(chain[:1])
    full.unpin(chain[:1])
    assert not cache.pins and not full.pins
    with pytest.raises(ValueError, match="at least 1 token"):
        PrefixCache(capacity=1, block=0)


def test_generate_beside_a_running_engine(vlm):
    """The engine passes its caches to every forward, so the model's own generate (which sets caches on
    the layers) can run in another thread at the same time, and both answer right."""
    prompts = [(f"Tell me about picture {i}.", [picture(20 + i)]) for i in range(4)]
    want = [vlm.generate(p, images=ims, max_new_tokens=12) for p, ims in prompts]
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=4, max_seq_len=256).start()
    try:
        got = [[""] for _ in prompts]
        requests = []
        for i, (p, ims) in enumerate(prompts):
            r = Request(
                inputs=vlm.inputs(p, ims),
                params=SamplingParams(max_tokens=12),
                emit=lambda ev, i=i: got[i].__setitem__(0, got[i][0] + ev.text),
            )
            engine.submit(r)
            requests.append(r)
        beside = [vlm.generate(p, images=ims, max_new_tokens=12) for p, ims in prompts]
        assert all(r.done.wait(60) for r in requests)
    finally:
        engine.stop(10)
    assert beside == want and [g[0] for g in got] == want


def test_a_malformed_request_is_refused_at_submit(vlm):
    """A request whose tokens do not fit its pictures is refused when it is submitted (a 400 naming the
    mismatch), before it takes a place in the queue; the request submitted beside it is answered."""
    good = vlm.inputs("Describe this.", [picture(30)])
    ids = good["input_ids"]
    # LLaVA: one picture token fewer than the picture needs; IDEFICS: ids one shorter than the image mask
    llava = isinstance(vlm.model, VipLlavaModel)
    cut = ids[0].tolist().index(vlm.model.config.image_token_index) if llava else 1
    keep = torch.arange(ids.shape[1]) != cut
    bad = {**good, "input_ids": ids[:, keep], "attention_mask": good["attention_mask"][:, keep]}
    want = vlm.generate("Describe this.", images=[picture(30)], max_new_tokens=5)
    events: list = []
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=4, max_seq_len=128)
    with pytest.raises(InvalidRequest, match="image" if llava else "image_attention_mask") as refused:
        engine.submit(Request(inputs=bad, params=SamplingParams(max_tokens=5), emit=events.append))
    assert refused.value.status == 400 and engine.queue_depth == 0 and not events
    job = Request(inputs=good, params=SamplingParams(max_tokens=5), emit=events.append)
    engine.submit(job)
    engine.start()
    try:
        assert job.done.wait(60)
    finally:
        engine.stop(10)
    assert "".join(e.text for e in events) == want


def test_a_request_past_its_deadline_ends_with_a_timeout(vlm):
    """The deadline is checked at every step; the request ends with a typed timeout (408 on the server)."""
    import time

    from vlmkit.serve.errors import RequestTimeout

    inputs = vlm.inputs("What is this?", [picture(12)])  # the random model answers it at full length
    events = []
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=2, max_seq_len=128).start()
    try:
        r = Request(
            inputs=inputs, params=SamplingParams(max_tokens=7), emit=events.append, deadline=time.monotonic()
        )
        engine.submit(r)
        assert r.done.wait(60)
    finally:
        engine.stop(10)
    end = events[-1]
    assert end.finish_reason == "error" and isinstance(end.error, RequestTimeout) and end.error.status == 408


JOINING = [
    ("Describe this.", [picture(40)], 1),
    ("Hello there, how are you today?", [], 1),  # text only, the longest prompt
    ("Compare", [picture(41), picture(42)], 2),  # two choices: its row is copied
    ("Hi", [], 1),
    ("Again", [picture(40)], 1),
]


def start_together(vlm, engine: Engine, jobs=JOINING, max_tokens: int = 6):
    """Submit every job before the engine starts, so that they all join in its first round; each one's
    events."""
    events = [[] for _ in jobs]
    requests = []
    for (text, ims, n), ev in zip(jobs, events, strict=True):
        requests.append(
            Request(
                inputs=vlm.inputs(text, ims),
                params=SamplingParams(max_tokens=max_tokens, n=n),
                emit=ev.append,
            )
        )
        engine.submit(requests[-1])
    engine.start()
    try:
        assert all(r.done.wait(60) for r in requests)
    finally:
        engine.stop(10)
    return events


def texts_of(events, n: int) -> list[str]:
    return ["".join(e.text for e in events if e.index == j) for j in range(n)]


def count_prefills(vlm, monkeypatch) -> list[int]:
    """The rows of every prefill the model runs from now on, in order (the list fills as they run)."""
    batches: list[int] = []
    prefill = type(vlm.model).prefill

    def counting(self, ids, **kw):
        batches.append(ids.shape[0])
        return prefill(self, ids, **kw)

    monkeypatch.setattr(type(vlm.model), "prefill", counting)
    return batches


def test_requests_that_join_together_run_in_one_prefill(vlm, monkeypatch):
    """Prompts of different lengths, with pictures and without, one with two choices, run as one prefill
    padded on the right; every answer equals the request run alone."""
    want = [vlm.generate(text, images=ims, max_new_tokens=6) for text, ims, _ in JOINING]
    batches = count_prefills(vlm, monkeypatch)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=8, max_seq_len=128, prefix_cache_mb=0)
    events = start_together(vlm, engine)
    assert batches == [len(JOINING)]
    for (_, _, n), ev, w in zip(JOINING, events, want, strict=True):
        assert texts_of(ev, n) == [w] * n
        assert [e.finish_reason for e in ev if e.finish_reason] == ["length"] * n


def test_prompts_after_cached_blocks_join_one_prefill(vlm, monkeypatch):
    """Prompts that start with blocks the prefix cache holds (of different lengths) and one that starts with
    none join one prefill, each after its own blocks at its own positions; every answer equals the request
    run alone."""
    pic = picture(40)  # (answers whose text has no broken byte-fallback run: see IncrementalDecoder)
    first = ("Describe this picture in detail.", [pic])
    group = [
        ("Describe this picture in detail, please.", [pic]),  # most of the first prompt's blocks
        ("Describe this.", [pic]),  # fewer of them
        ("Describe this.", [picture(50)]),  # another picture: nothing cached
        ("Describe this picture in detail.", [pic]),  # all but the block of its last token
    ]
    want = [vlm.generate(text, images=ims, max_new_tokens=5) for text, ims in group]
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=4, max_seq_len=128, prefix_block=4).start()
    try:
        # the first prompt holds every row while the group queues, and leaves its blocks in the cache
        texts = [""] * 4
        blocker = Request(
            inputs=vlm.inputs(*first),
            params=SamplingParams(max_tokens=12, n=4),
            emit=lambda ev: None,
        )
        engine.submit(blocker)
        batches = count_prefills(vlm, monkeypatch)  # from here on
        requests = []
        for i, (text, ims) in enumerate(group):

            def emit(ev, i=i):
                if ev.finish_reason is None:
                    texts[i] += ev.text

            requests.append(
                Request(inputs=vlm.inputs(text, ims), params=SamplingParams(max_tokens=5), emit=emit)
            )
            engine.submit(requests[-1])
        assert blocker.done.wait(60) and all(r.done.wait(60) for r in requests)
    finally:
        engine.stop(10)
    assert batches[-1] == len(group) and len(batches) == 2  # the blocker's prefill, then the group's
    cached = [r.cached_tokens for r in requests]
    assert cached[0] > cached[1] > 0 and cached[2] == 0 and cached[3] >= cached[0]
    assert texts == want


def test_a_failing_joint_prefill_runs_each_prompt_alone(vlm, monkeypatch):
    """If the joint prefill fails, each prompt runs alone: a prompt that fails alone too ends its own request
    with the error, and the rows of the ones after it move up into its rows."""
    from vlmkit.serve.executor import Executor

    want = [vlm.generate(text, images=ims, max_new_tokens=6) for text, ims, _ in JOINING]
    prefill = Executor._prefill
    failing = {}

    def failing_prefill(self, jobs, rows):
        if len(jobs) > 1:
            raise RuntimeError("out of memory (simulated)")
        ((key, _),) = jobs
        if not failing:
            failing["key"] = key + 2  # the third prompt: the one with two choices
        if key == failing["key"]:
            raise RuntimeError("this prompt fails (simulated)")
        return prefill(self, jobs, rows)

    monkeypatch.setattr(Executor, "_prefill", failing_prefill)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=8, max_seq_len=128)
    events = start_together(vlm, engine)
    for i, ((_, _, n), ev, w) in enumerate(zip(JOINING, events, want, strict=True)):
        if i == 2:
            ends = [e for e in ev if e.finish_reason]
            assert [e.finish_reason for e in ends] == ["error"] * n and "simulated" in str(ends[0].error)
        else:
            assert texts_of(ev, n) == [w] * n
    assert engine.running == 0 and not engine.executor.prompts


def test_questions_about_one_picture_share_its_prefill(vlm, monkeypatch):
    """Requests that join together and start alike (one picture asked about three times) do not all compute
    their shared start: the first does, the others wait one round for its blocks in the prefix cache while
    the requests behind them take the free rows; a shared start under half of a prompt is not worth the
    wait. Every answer equals the request run alone."""
    pic = picture(60)
    group = [
        ("Describe this picture in detail.", [pic]),
        ("What is in this picture?", [pic]),  # held: the same picture starts it
        ("Is it a cat?", [pic]),  # held
        ("Describe this.", [picture(61)]),  # another picture: takes a held request's row
        ("What is in this picture?", [picture(62)]),
    ]
    want = [vlm.generate(text, images=ims, max_new_tokens=5) for text, ims in group]
    batches = count_prefills(vlm, monkeypatch)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=3, max_seq_len=128, prefix_block=4)
    texts = [""] * len(group)
    requests = []
    for i, (text, ims) in enumerate(group):

        def emit(ev, i=i):
            if ev.finish_reason is None:
                texts[i] += ev.text

        requests.append(Request(inputs=vlm.inputs(text, ims), params=SamplingParams(max_tokens=5), emit=emit))
        engine.submit(requests[-1])  # all wait before the first round: they join together
    while any(not r.done.is_set() for r in requests):
        engine.run_once()
    engine.stop()
    assert texts == want
    if not isinstance(vlm.model, VipLlavaModel):
        # an IDEFICS picture is one token: the questions share one block of about 19 tokens, not worth a round
        assert batches == [3, 2] and [r.cached_tokens for r in requests] == [0] * 5
        return
    assert batches == [3, 2]  # the first question and the two other pictures, then the two held
    first = vlm.inputs(*group[0])["input_ids"][0].tolist()
    for i in (1, 2):  # the whole blocks of its start that the first question computed
        ids = vlm.inputs(*group[i])["input_ids"][0].tolist()
        common = next(t for t, (a, b) in enumerate(zip(ids + [None], first + [None], strict=False)) if a != b)
        assert requests[i].cached_tokens == min(common, len(ids) - 1) // 4 * 4 > 0
    assert [requests[i].cached_tokens for i in (0, 3, 4)] == [0, 0, 0]
