"""Checkpoint discovery, shards, .bin files, key layouts, save round trip and every loading error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from oracle import hf_llava_config, hf_llava_model, llava_inputs
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit import CheckpointError
from vlmkit.weights import SAFE_INDEX, weight_files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = hf_llava_config("vipllava", vision_feature_layers=[-2, 1], text=dict(num_key_value_heads=2))
    hf = hf_llava_model(cfg, seed=1)
    folder = tmp_path_factory.mktemp("ref")
    hf.save_pretrained(folder)
    inputs = llava_inputs(cfg, shorter=(0, 2))
    with torch.no_grad():
        logits = hf(**inputs).logits
    return cfg, hf, folder, inputs, logits


def copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_same(model, reference):
    _, _, _, inputs, ref = reference
    mask = inputs["attention_mask"].bool()
    assert (logits_of(model, inputs) - ref)[mask].abs().max().item() < 1e-4


def test_sharded_checkpoint(reference, tmp_path):
    _, hf, _, _, _ = reference
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / SAFE_INDEX).is_file() and len(weight_files(tmp_path)) > 1
    assert_same(vlmkit.load_model(tmp_path), reference)


def test_our_own_sharded_save_loads_back(reference, tmp_path):
    model = vlmkit.load_model(reference[2])
    model.save_pretrained(tmp_path, max_shard_bytes=30_000)
    assert len(weight_files(tmp_path)) > 1
    assert_same(vlmkit.load_model(tmp_path), reference)


def test_save_pretrained_round_trips_through_transformers(reference, tmp_path):
    from transformers import VipLlavaForConditionalGeneration

    model = vlmkit.load_model(reference[2])
    model.save_pretrained(tmp_path)
    back, info = VipLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    _, _, _, inputs, ref = reference
    assert (logits_of(back.eval(), inputs) - ref).abs().max().item() < 1e-4


def test_bin_checkpoint_loads_weights_only(reference, tmp_path):
    folder = copy(reference[2], tmp_path / "bin")
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    assert_same(vlmkit.load_model(folder), reference)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_arbitrary_objects_is_refused(reference, tmp_path, capsys):
    folder = copy(reference[2], tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        vlmkit.load_model(folder)
    assert "must never run" not in capsys.readouterr().out


def test_missing_unexpected_and_wrong_shape_reported_together(reference, tmp_path):
    folder = copy(reference[2], tmp_path / "bad")
    sd = load_file(str(folder / "model.safetensors"))
    del sd["language_model.model.norm.weight"]
    del sd["multi_modal_projector.linear_1.bias"]
    sd["language_model.model.extra.weight"] = torch.zeros(3)
    sd["multi_modal_projector.linear_2.weight"] = torch.zeros(5, 5)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        vlmkit.load_model(folder)
    msg = str(e.value)
    assert "2 missing" in msg and "language_model.model.norm.weight" in msg
    assert "multi_modal_projector.linear_1.bias" in msg
    assert "1 unexpected" in msg and "language_model.model.extra.weight" in msg
    assert "1 wrong shape" in msg and "multi_modal_projector.linear_2.weight: checkpoint (5, 5)" in msg


def test_config_that_does_not_fit_the_weights(reference, tmp_path):
    folder = copy(reference[2], tmp_path / "cfg")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="asks for 4 decoder layers but the weights hold 3"):
        vlmkit.load_model(folder)  # said before a model of that depth is built
    cfg["text_config"]["num_hidden_layers"] = 3
    cfg["text_config"]["intermediate_size"] += 8  # same depth, other shapes: the tensors are named
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        vlmkit.load_model(folder)
    assert "language_model.model.layers.0.mlp.up_proj.weight" in str(e.value)


def test_corrupt_safetensors(reference, tmp_path):
    folder = copy(reference[2], tmp_path / "corrupt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        vlmkit.load_model(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        vlmkit.load_model(folder)


def test_missing_shard_is_named(reference, tmp_path):
    reference[1].save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        vlmkit.load_model(tmp_path)


def test_missing_or_broken_config(reference, tmp_path):
    folder = copy(reference[2], tmp_path / "nocfg")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        vlmkit.load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        vlmkit.load_model(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not supported"):
        vlmkit.load_model(folder)


def test_no_weights_in_folder(reference, tmp_path):
    folder = copy(reference[2], tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        vlmkit.load_model(folder)


def test_not_a_folder_and_offline_repo(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vlmkit.load_model(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        vlmkit.load_model("llava-hf/vip-llava-7b-hf")


def test_dtype_strings(reference):
    model = vlmkit.load_model(reference[2], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        vlmkit.load_model(reference[2], dtype="float8")


def test_checkpoint_dtype_is_kept_by_default(reference, tmp_path):
    model = vlmkit.load_model(reference[2], dtype=torch.float16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    assert next(vlmkit.load_model(tmp_path).parameters()).dtype == torch.float16


def test_half_storage_loads_in_the_configs_dtype_as_transformers_does(reference, tmp_path):
    from safetensors import safe_open
    from transformers import VipLlavaForConditionalGeneration

    model = vlmkit.load_model(reference[2])
    model.save_pretrained(tmp_path, storage_dtype=torch.float16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    ours = vlmkit.load_model(tmp_path)
    theirs = VipLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()  # dtype "auto" by default
    assert next(ours.parameters()).dtype == next(theirs.parameters()).dtype == torch.float32
    inputs = reference[3]
    assert (logits_of(ours, inputs) - logits_of(theirs, inputs)).abs().max().item() < 1e-4
    assert (logits_of(ours, inputs) - reference[4]).abs().max().item() > 0  # the weights were rounded
    assert next(vlmkit.load_model(tmp_path, dtype="float16").parameters()).dtype == torch.float16


def test_saved_files_are_readable_by_others_as_plainly_written_files_are(reference, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        vlmkit.load_model(reference[2]).save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
