"""The lmms-eval model entry: `lmms_eval --model vlmkit` (plugin registered through LMMS_EVAL_PLUGINS) runs a
local task definition on generated shapes-world data with the demo model, batched, and scores what
`vlmkit eval` scores on the same questions; loglikelihood requests are answered too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is installed with --no-deps (README, Evaluate); its requirements replace torch",
)

from vlmkit.eval import evaluate  # noqa: E402
from vlmkit.eval.shapes import known_examples, save_png, write_vqav2  # noqa: E402

TASK_YAML = """task: shapes_count
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_utils.doc_to_visual
doc_to_text: !function shapes_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 24
  temperature: 0
  do_sample: false
process_results: !function shapes_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""


def write_task(folder: Path, n: int) -> list[dict]:
    rows = []
    for i, ex in enumerate(known_examples("vipllava", "count")[:n]):
        path = folder / "images" / f"{i}.png"
        save_png(ex.images[0], path)
        rows.append({"image": str(path), "question": ex.question, "answer": ex.answer})
    (folder / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "shapes_count.yaml").write_text(TASK_YAML.format(data=folder / "shapes.jsonl"))
    (folder / "shapes_utils.py").write_text(TASK_UTILS)
    return rows


def test_lmms_eval_runs_a_local_task_with_vlmkit(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, 40)
    env = {
        **os.environ,
        "LMMS_EVAL_PLUGINS": "vlmkit.eval.lmms",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf-cache")
    out = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "vlmkit", "--model_args", "pretrained=demo",
         "--tasks", "shapes_count", "--include_path", str(tasks), "--batch_size", "8",
         "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    found = list((tmp_path / "out").rglob("*results*.json"))  # lmms-eval exits 0 even when it fails
    assert out.returncode == 0 and len(found) == 1, out.stdout[-3000:] + out.stderr[-3000:]
    results = found[0]
    score = json.loads(results.read_text())["results"]["shapes_count"]["exact_match,none"]
    # the same 40 questions through `vlmkit eval` (VQAv2 layout): the same answers, the same score
    write_vqav2(tmp_path / "vqav2", known_examples("vipllava", "count")[:40])
    ours = evaluate("vqav2", tmp_path / "vqav2", "demo", prompt="{question}", progress=False)
    assert 100 * score == pytest.approx(ours.scores["accuracy"])


def test_model_entry_answers_loglikelihood_and_refuses_unknown_arguments(tmp_path):
    from lmms_eval.api.instance import Instance

    from vlmkit.eval.lmms.models.vlmkit import VlmkitLMM

    rows = write_task(tmp_path, 2)
    lm = VlmkitLMM(pretrained="demo", batch_size="2")
    docs = [{"image": r["image"], "question": r["question"], "answer": r["answer"]} for r in rows]
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        from PIL import Image

        return [Image.open(doc["image"]).convert("RGB")]

    def request(kind, args, doc_id):
        return Instance(
            request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}
        )

    answers = lm.generate_until(
        [request("generate_until", (d["question"], {"max_new_tokens": 8, "until": ["\n\n"]}, visual, i, "t", "test"), i)
         for i, d in enumerate(docs)]
    )  # fmt: skip
    assert answers == [d["answer"] for d in docs]  # the first two known count questions are answered right
    right, wrong = lm.loglikelihood(
        [request("loglikelihood", (docs[0]["question"], " " + a, visual, 0, "t", "test"), 0)
         for a in (docs[0]["answer"], "four")]
    )  # fmt: skip
    assert right[1] is True and right[0] > wrong[0]  # greedy gives the right answer, and it is more likely
    with pytest.raises(ValueError, match="takes no \\['temperature'\\]"):
        VlmkitLMM(pretrained="demo", temperature=0)
