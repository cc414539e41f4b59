"""The demo-model pipeline end to end on a few rows: tokenizer, configs, processor files, training, eval."""

from __future__ import annotations

import pytest

import vlmkit
from vlmkit.demo import build


@pytest.mark.parametrize("family", ["vipllava", "idefics"])
def test_pipeline_runs_and_loads(family, tmp_path):
    scores = build.build(tmp_path / family, family, rows=24, steps=2, batch_size=4, eval_rows=2)
    assert set(scores) == set(build.QUESTION_TYPES[family]) and all(0 <= v <= 1 for v in scores.values())
    final = tmp_path / family / "run" / "final"
    model = vlmkit.load_model(final)
    assert model.config.to_hf()["model_type"] == family
    proc = vlmkit.load_processor(final)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") is not None
