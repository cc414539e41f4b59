"""LoRA adapters served beside their base model, on both demo models: adapters trained with `vlmkit finetune
--train lora` answer as the model with that adapter merged (`merge-lora`) does, also when 16 concurrent
requests for two adapters and the base share every decode step; adapters load and unload at run time; the
prefix cache keeps each adapter's blocks apart; at most `max_loaded` sit in memory; adapters that do not fit
the model are refused with the reason."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from test_serve import NAMES, Live, examples, openai_messages

import vlmkit
from vlmkit.adapters import AdapterError, AdapterSet
from vlmkit.train.finetune import FinetuneConfig, finetune, merge_lora
from vlmkit.vlm import user_turn

ANSWERS = {"a": "a purple hexagon", "b": "three blue stars"}


def dataset(folder: Path, answer: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        turns = [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": answer},
        ]
        rows.append({"image": f"{i}.png", "conversations": turns})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module", params=["vipllava", "idefics"])
def trained(request, tmp_path_factory):
    """(family, {adapter: folder}, {adapter: merged VLM})."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = NAMES[request.param]
    folders, merged = {}, {}
    for name, answer in ANSWERS.items():
        config = FinetuneConfig(
            data=str(dataset(root / f"data-{name}", answer)),
            output_dir=str(root / name),
            model=base,
            train="lora",
            max_steps=12,
            lr=2e-2,
            batch_size=4,
            progress=False,
            lora_targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        )
        finetune(config)
        folders[name] = root / name / "final"
        merged[name] = vlmkit.VLM.load(merge_lora(folders[name], base, root / f"merged-{name}"))
    return request.param, folders, merged


def questions(family: str, n: int) -> list:
    return examples(family, n, seed=11)


def test_python_side_answers_as_the_merged_model(trained):
    family, folders, merged = trained
    vlm = vlmkit.VLM.load(NAMES[family], adapters=folders)
    plain = vlmkit.VLM.load(NAMES[family])
    for ex in questions(family, 3):
        turn = [user_turn(ex.question, ex.images)]
        for name in ANSWERS:
            want = merged[name].chat(turn, max_new_tokens=16)
            assert vlm.chat(turn, max_new_tokens=16, adapter=name) == want
            assert "".join(vlm.stream_chat(turn, max_new_tokens=16, adapter=name)) == want
        assert vlm.chat(turn, max_new_tokens=16) == plain.chat(turn, max_new_tokens=16)
    assert vlm.chat(turn, max_new_tokens=16, adapter="a") != vlm.chat(turn, max_new_tokens=16, adapter="b")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        vlm.chat(turn, adapter="c")


def test_sixteen_mixed_requests_share_the_batch_and_equal_the_merged_models(trained):
    family, folders, merged = trained
    vlm = vlmkit.VLM.load(NAMES[family])
    adapters = AdapterSet(vlm.model)
    for name, folder in folders.items():
        adapters.add(name, folder)
    live = Live(vlm, name=NAMES[family], adapters=adapters, engine_kw={"max_batch": 16, "max_seq_len": 512})
    try:
        asks = [(ex, [None, "a", "b"][i % 3]) for i, ex in enumerate(questions(family, 16))]
        expected = [
            (merged[name] if name else vlm).chat([user_turn(ex.question, ex.images)], max_new_tokens=16)
            for ex, name in asks
        ]

        def ask(item):
            ex, name = item
            reply = live.client.chat.completions.create(
                model=name or NAMES[family], messages=openai_messages(ex), max_tokens=16, temperature=0
            )
            assert reply.model == (name or NAMES[family])
            return reply.choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, asks))
        assert got == expected
        # the same picture and question again under another adapter: its own blocks, not the first one's
        ex = asks[0][0]
        for name in ("a", None, "a"):
            reply = live.client.chat.completions.create(
                model=name or "base", messages=openai_messages(ex), max_tokens=16, temperature=0
            )
            assert reply.choices[0].message.content == (merged[name] if name else vlm).chat(
                [user_turn(ex.question, ex.images)], max_new_tokens=16
            )
        assert reply.usage.prompt_tokens_details.cached_tokens > 0  # adapter a's blocks, reused for adapter a
    finally:
        live.close()


def test_adapters_load_and_unload_at_run_time(trained):
    family, folders, merged = trained
    vlm = vlmkit.VLM.load(NAMES[family])
    live = Live(vlm, name=NAMES[family], adapters=AdapterSet(vlm.model), api_key="k")
    try:
        auth = {"Authorization": "Bearer k"}
        assert (
            httpx.post(
                f"{live.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(folders["a"])}
            ).status_code
            == 401
        )
        load = httpx.post(
            f"{live.url}/v1/load_lora_adapter",
            json={"lora_name": "a", "lora_path": str(folders["a"])},
            headers=auth,
        )
        assert load.status_code == 200, load.text
        ids = [m.id for m in live.client.models.list().data]
        assert ids == [NAMES[family], "a"]
        ex = questions(family, 1)[0]
        want = merged["a"].chat([user_turn(ex.question, ex.images)], max_new_tokens=12)
        reply = live.client.chat.completions.create(
            model="a", messages=openai_messages(ex), max_tokens=12, temperature=0
        )
        assert reply.choices[0].message.content == want
        again = httpx.post(
            f"{live.url}/v1/load_lora_adapter",
            json={"lora_name": "a", "lora_path": str(folders["a"])},
            headers=auth,
        )
        assert again.status_code == 400 and "taken" in again.text
        bad = httpx.post(
            f"{live.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"}, headers=auth
        )
        assert bad.status_code == 400 and "adapter_config.json" in bad.text
        assert (
            httpx.post(
                f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=auth
            ).status_code
            == 200
        )
        with pytest.raises(openai.NotFoundError, match="not loaded"):
            live.client.chat.completions.create(model="a", messages=openai_messages(ex), max_tokens=4)
        assert (
            httpx.post(
                f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=auth
            ).status_code
            == 404
        )
        assert [m.id for m in live.client.models.list().data] == [NAMES[family]]
    finally:
        live.close()


def test_at_most_max_loaded_in_memory_and_mismatched_adapters_are_refused(trained):
    family, folders, merged = trained
    vlm = vlmkit.VLM.load(NAMES[family])
    adapters = AdapterSet(vlm.model, max_loaded=1)
    for name, folder in folders.items():
        adapters.add(name, folder)
    assert list(adapters.loaded) == ["b"] and adapters.names() == ["a", "b"]
    ex = questions(family, 1)[0]
    turn = [user_turn(ex.question, ex.images)]
    vlm.adapters = adapters
    assert vlm.chat(turn, max_new_tokens=12, adapter="a") == merged["a"].chat(turn, max_new_tokens=12)
    assert list(adapters.loaded) == ["a"]  # read again from its folder; b dropped
    other = vlmkit.VLM.load(NAMES["idefics" if family == "vipllava" else "vipllava"])
    with pytest.raises(AdapterError, match="another base model"):
        AdapterSet(other.model).add("a", folders["a"])


def test_fused_projections_add_each_layers_own_update(trained):
    """q/k/v and gate/up, fused into one product at load, take their adapters' updates in one product too; rows
    with different adapters and none give the logits of the layers run one by one (the unfused path)."""
    family, folders, merged = trained
    vlm = vlmkit.VLM.load(NAMES[family], adapters=folders)
    a, b = (vlm.adapters.get(name) for name in ANSWERS)
    fused, alone, base = fused_alone_and_base(vlm, family, [a, None, b])
    torch.testing.assert_close(fused, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(fused[0], base[0], atol=1e-3) and torch.allclose(fused[1], base[1], atol=1e-5)


def fused_alone_and_base(vlm, family: str, adapters: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of one question repeated in a row per entry of `adapters` (None: the base model): through the
    fused products, through the layers one by one (each its own hook, as with gradients), and without any."""
    ex = questions(family, 1)[0]
    one = vlm.chat_inputs([user_turn(ex.question, ex.images)])
    n = len(adapters)
    batch = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in one.items() if isinstance(v, torch.Tensor)}
    with vlm.adapters.rows(adapters):
        with torch.no_grad():
            fused = vlm.model(**batch).logits
        with torch.enable_grad():
            alone = vlm.model(**batch).logits.detach()
    with torch.no_grad():
        base = vlm.model(**batch).logits
    return fused, alone, base


def random_adapter(folder: Path, model, ranks: dict[str, int], seed: int) -> Path:
    """A peft folder with random pairs of the given rank on those projections (by name) of every decoder layer."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        rank = ranks.get(name.rpartition(".")[2])
        if rank and name.startswith("language_model.") and ".layers." in name:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, generator=g
            )
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(
                module.out_features, rank, generator=g
            )
    folder.mkdir(parents=True)
    save_file({k: v * 0.05 for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 4, "r": 4}))
    return folder


def test_fused_groups_with_ranks_that_differ_by_adapter_and_layer(tmp_path):
    """Adapters of different ranks, each changing a different part of the fused groups (one q and k, the other
    q and v; gate in one, up in the other), in one batch with a row that has none: the fused products give the
    layers' own results."""
    vlm = vlmkit.VLM.load("demo")
    x_ranks = {"q_proj": 4, "k_proj": 2, "gate_proj": 8, "down_proj": 3}
    y_ranks = {"q_proj": 2, "v_proj": 6, "up_proj": 5, "o_proj": 1}
    vlm.adapters = AdapterSet(vlm.model)
    x = vlm.adapters.add("x", random_adapter(tmp_path / "x", vlm.model, x_ranks, 0))
    y = vlm.adapters.add("y", random_adapter(tmp_path / "y", vlm.model, y_ranks, 1))
    fused, alone, base = fused_alone_and_base(vlm, "vipllava", [x, None, y, x])
    torch.testing.assert_close(fused, alone, rtol=0, atol=1e-5)
    assert torch.allclose(fused[1], base[1], atol=1e-5) and torch.equal(fused[0], fused[3])
    assert not torch.allclose(fused[0], base[0], atol=1e-3) and not torch.allclose(
        fused[2], base[2], atol=1e-3
    )
