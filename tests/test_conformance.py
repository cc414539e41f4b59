"""The family conformance suite: every (family, model_type) in the registry, on its tiny random checkpoint
(tests/families.py), against transformers and against itself:
- the processor gives transformers' tensors for a prompt with pictures, and its text round-trips;
- the forward gives transformers' logits (1e-4, fp32), with pictures and without;
- greedy and beam `generate` give transformers' tokens;
- the engine's answer to a request, batched with others that join and leave, equals `generate`'s.
A new family gets all of this by registering and adding its test checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import CHECKPOINTS, registered
from PIL import Image

import vlmkit
from vlmkit.serve.engine import Engine, Request, SamplingParams

TOL = 1e-4


def picture(seed: int, size: tuple[int, int] = (40, 52)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


PROMPTS = [
    ("Describe the picture.", [picture(0)]),
    ("Compare these two, please.", [picture(1, (30, 60)), picture(2)]),
    ("Just some text, no picture.", []),
]


@pytest.fixture(scope="module", params=registered(), ids=lambda p: "-".join(dict.fromkeys(p)))
def family(request, tmp_path_factory):
    key = request.param
    assert key in CHECKPOINTS, f"family {key} is registered but has no test checkpoint in tests/families.py"
    entry = CHECKPOINTS[key]
    folder, hf, proc = entry.build(tmp_path_factory.mktemp("-".join(key)))
    return entry, vlmkit.VLM.load(folder), hf, proc, folder


def test_the_registry_is_covered():
    assert set(registered()) <= set(CHECKPOINTS), "every registered family needs a test checkpoint"


def test_processor_matches_transformers_and_round_trips(family):
    entry, vlm, _, proc, _ = family
    for prompt, pictures in PROMPTS:
        ours = vlm.inputs(prompt, pictures)
        want = entry.reference_inputs(proc, prompt, pictures)
        for key, value in want.items():
            assert key in ours, key
            assert ours[key].shape == value.shape, key
            assert (ours[key].float() - value.float()).abs().max() < TOL, key
        assert prompt in vlm.tokenizer.decode(ours["input_ids"][0].tolist(), skip_special_tokens=True)


def test_forward_matches_transformers(family):
    entry, vlm, hf, proc, _ = family
    for prompt, pictures in PROMPTS:
        inputs = entry.reference_inputs(proc, prompt, pictures)
        with torch.no_grad():
            want = hf(**inputs).logits
            got = vlm.model(**inputs).logits
        assert (got - want).abs().max() < TOL


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_matches_transformers(family, num_beams):
    entry, vlm, hf, proc, _ = family
    for prompt, pictures in PROMPTS[:2]:
        inputs = entry.reference_inputs(proc, prompt, pictures)
        settings = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
        with torch.no_grad():
            want = hf.generate(**inputs, **settings)
        got = vlm.model.generate(**inputs, **settings)
        assert got.tolist() == want.tolist()


def test_engine_equals_generate_in_a_batch(family):
    _, vlm, _, _, _ = family
    lengths = [7, 3, 9, 5]
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    want = [vlm.generate(p, images=ims, max_new_tokens=n) for (p, ims), n in zip(jobs, lengths, strict=True)]
    texts = [""] * len(jobs)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=3, max_seq_len=256).start()
    try:
        requests = []
        for i, ((p, ims), n) in enumerate(zip(jobs, lengths, strict=True)):

            def emit(ev, i=i):
                texts[i] += ev.text

            requests.append(
                Request(inputs=vlm.inputs(p, ims), params=SamplingParams(max_tokens=n), emit=emit)
            )
            engine.submit(requests[-1])
        assert all(r.done.wait(60) for r in requests)
    finally:
        engine.stop(10)
    assert texts == want


def test_encode_takes_each_pictures_item_on_its_own(family):
    """`encode` gives one feature tensor per item, each the same as when the item is encoded alone: what the
    engine's feature cache relies on. Pictures of different sizes (LLaVA-NeXT: different counts of tiles)
    go in one call."""
    _, vlm, _, _, _ = family
    pictures = [picture(1, (30, 60)), picture(2), picture(3, (75, 24))]
    plan = vlm.model.plan(vlm.inputs("Compare these three.", pictures))
    assert len(plan.items) == 3
    with torch.no_grad():
        together = vlm.model.encode(plan.items)
        alone = [vlm.model.encode([item])[0] for item in plan.items]
    assert len(together) == 3
    for a, b in zip(together, alone, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5


def test_info_parts_sum_to_the_total(family):
    """`vlmkit info` lists every parameter under one part, top-level parameters as parts of their own."""
    from vlmkit.cli import info_command

    _, vlm, _, _, folder = family
    info = info_command(str(folder))
    assert info["parameters"] == sum(info["parts"].values()) == sum(p.numel() for p in vlm.model.parameters())
    held = {name.partition(".")[0] for name, _ in vlm.model.named_parameters()}
    assert {part.partition(".")[0] for part in info["parts"]} == held


GENERIC = ["serve", "train", "generation.py", "beams.py", "runner.py", "fastpath.py", "cli.py", "vlm.py"]


def test_generic_layers_import_no_family():
    """Generation, the engine, training, the CLI and the fast paths reach a family only through the registry
    (vlmkit.models) and the runner interface: none of them imports a family package."""
    import ast
    from pathlib import Path

    from vlmkit.models import registry

    root = Path(vlmkit.__file__).parent
    packages = {f"vlmkit.{family.name}" for family in registry()}
    files = [
        p
        for name in GENERIC
        for p in ([root / name] if name.endswith(".py") else (root / name).rglob("*.py"))
    ]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if any(n == p or n.startswith(p + ".") for p in packages)]
            assert not bad, f"{path.relative_to(root)} imports {bad}"
