"""`vlmkit eval` end to end with the built-in demo models on shapes-world questions written in each benchmark's
layout: the scores equal the demo models' known accuracy (README: 200 questions per type from the seed
`make demo-models` scores on), answers do not depend on the batch size, --limit and resume, the command
line, ViP-Bench with a judge, few-shot, quantized loading."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import vlmkit
from vlmkit.cli import main
from vlmkit.eval import evaluate
from vlmkit.eval import run as eval_module
from vlmkit.eval.shapes import (
    counting_rounds,
    known_examples,
    write_captions,
    write_mmbench,
    write_scienceqa,
    write_textvqa,
    write_vipbench,
    write_visual7w,
    write_vizwiz,
    write_vqav2,
)
from vlmkit.serve.engine import Engine


@pytest.fixture(scope="module")
def vip():
    return vlmkit.VLM.load("demo")


@pytest.fixture(scope="module")
def idefics():
    return vlmkit.VLM.load("demo-idefics")


@pytest.fixture(scope="module")
def count_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqav2")
    write_vqav2(folder, known_examples("vipllava", "count"))
    return folder


# The demo's known accuracy per question type (README, "Built-in demo models"), each benchmark's reader and
# metric on the same 200 questions. The prompt is the question alone, as the demo models were trained; a
# multiple-choice answer ("star") picks its option by text, as MMBench's extraction does.
VIPLLAVA_CASES = [
    ("vqav2", write_vqav2, "count", "accuracy", 97.5),
    ("visual7w", write_visual7w, "box_shape", "accuracy", 100.0),
    ("scienceqa", write_scienceqa, "count", "accuracy", 97.5),
    ("mmbench", write_mmbench, "arrow_color", "accuracy", 99.0),
]


@pytest.mark.parametrize("task, writer, kind, metric, known", VIPLLAVA_CASES)
def test_vipllava_demo_scores_its_known_accuracy(vip, tmp_path, task, writer, kind, metric, known):
    writer(tmp_path, known_examples("vipllava", kind))
    extra = {"circular": False} if task == "mmbench" else {}
    result = evaluate(task, tmp_path, vip, prompt="{question}", progress=False, **extra)
    assert len(result.samples) == 200 and result.errors == 0
    assert result.scores[metric] == pytest.approx(known)


def caption_run(vlm, family: str, folder: Path, known: float) -> None:
    """COCO (Karpathy layout): the demo's caption accuracy is the share of answers equal to the reference;
    CIDEr is computed over them."""
    write_captions(folder, known_examples(family, "caption"))
    result = evaluate("coco", folder, vlm, prompt="Describe the image.", progress=False)
    exact = sum(r["output"] == r["target"][0] for r in result.samples)
    assert 100 * exact / 200 == pytest.approx(known)
    assert result.scores["cider"] > 500  # near-perfect captions of a 26-word world
    assert all("score" in r for r in result.samples)


def test_vipllava_demo_captions(vip, tmp_path):
    caption_run(vip, "vipllava", tmp_path, 99.5)


@pytest.mark.slow
def test_idefics_demo_captions(idefics, tmp_path):
    caption_run(idefics, "idefics", tmp_path, 96.5)


def test_idefics_demo_scores_its_known_accuracy(idefics, count_data, tmp_path):
    write_vqav2(tmp_path, known_examples("idefics", "count"))
    result = evaluate("vqav2", tmp_path, idefics, prompt="{question}", progress=False)
    assert result.scores["accuracy"] == pytest.approx(96.0)


def test_other_layouts_end_to_end(vip, tmp_path):
    """TextVQA, VizWiz, OK-VQA and Flickr30K read and scored on the first 20 count / caption questions."""
    count = known_examples("vipllava", "count")[:20]
    for task, write in (("textvqa", write_textvqa), ("vizwiz", write_vizwiz)):
        write(tmp_path / task, count)
    write_vqav2(tmp_path / "okvqa", count, okvqa=True)
    write_captions(tmp_path / "flickr30k", known_examples("vipllava", "caption")[:20], flickr=True)
    for task in ("textvqa", "vizwiz", "okvqa"):
        r = evaluate(task, tmp_path / task, vip, prompt="{question}", progress=False)
        assert r.scores["accuracy"] == 100.0, (task, [x for x in r.samples if x["score"] < 1])
    r = evaluate("flickr30k", tmp_path / "flickr30k", vip, prompt="Describe the image.", progress=False)
    assert r.scores["cider"] > 500


def test_answers_do_not_depend_on_the_batch(vip, count_data):
    one = evaluate("vqav2", count_data, vip, prompt="{question}", limit=40, batch_size=1, progress=False)
    many = evaluate("vqav2", count_data, vip, prompt="{question}", limit=40, batch_size=16, progress=False)
    assert [r["output"] for r in one.samples] == [r["output"] for r in many.samples]
    assert one.scores == many.scores


def test_questions_about_one_picture_reuse_its_start(vip, tmp_path, monkeypatch):
    """VQAv2 asks several questions of each picture: only each picture's first question computes the
    picture's tokens, the others take them from the prefix cache (they are asked next to it, wherever the
    file puts them, and those that joined with it wait a round), and every answer equals the one at batch
    size 1."""
    rounds = counting_rounds(12, 4)
    write_vqav2(tmp_path, [rounds[p * 4 + j] for j in range(4) for p in range(12)])  # pictures interleaved
    requests = []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, r: (requests.append(r), submit(self, r))[1])
    many = evaluate("vqav2", tmp_path, vip, prompt="{question}", batch_size=16, progress=False)
    picture_start = 16  # "<s><s>###Human: ", the 9 picture tokens and "\n": the demo's first block
    assert [r.cached_tokens for r in requests] == ([0] + [picture_start] * 3) * 12
    one = evaluate("vqav2", tmp_path, vip, prompt="{question}", batch_size=1, progress=False)
    assert [r["output"] for r in one.samples] == [r["output"] for r in many.samples]
    assert many.scores["accuracy"] > 90


def test_answers_stop_where_the_context_ends(vip, count_data):
    """The engine's rows hold max_seq_len tokens (by default the model's context): an answer budget that
    does not fit after the prompt is cut to what does (finish "length"), and a prompt that fills the rows
    alone is an error of its own."""
    assert vip.model.config.text_config.max_position_embeddings == 512
    ok = evaluate("vqav2", count_data, vip, prompt="{question}", limit=4, max_new_tokens=600, progress=False)
    assert all(r["finish_reason"] == "stop" for r in ok.samples)  # the default: the model's 512 tokens
    prompt_tokens = 24  # "<s>###Human: " + 9 picture tokens + the question + "###Assistant:"
    cut = evaluate(
        "vqav2", count_data, vip, prompt="{question}", limit=4, max_seq_len=prompt_tokens + 1, progress=False
    )
    assert [r["finish_reason"] for r in cut.samples] == ["length"] * 4  # one token of room
    assert [r["output"] for r in cut.samples] == [r["output"] for r in ok.samples]  # a one-token answer
    refused = evaluate(
        "vqav2", count_data, vip, prompt="{question}", limit=2, max_seq_len=prompt_tokens, progress=False
    )
    assert all(r["finish_reason"] == "error" and "exceeds max_seq_len" in r["error"] for r in refused.samples)


def test_engine_rows_grow_with_what_the_prompts_need(vip, count_data, monkeypatch):
    """The engine's rows are as long as the prompts and budgets seen so far need (not the model's context);
    a job that needs longer rows waits for the running ones, then an engine with rows at least twice as long
    answers it. The answers are those of one engine with rows of the whole context."""
    from vlmkit.eval import get_task
    from vlmkit.eval.batching import Job, engine_answers
    from vlmkit.eval.run import messages_for
    from vlmkit.serve import engine as engine_module
    from vlmkit.serve.engine import SamplingParams

    sizes: list[int] = []
    real_init = engine_module.Engine.__init__

    def recording(self, *args, **kwargs):
        sizes.append(kwargs["max_seq_len"])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "__init__", recording)
    samples = get_task("vqav2").samples(count_data)[:6]
    budgets = [8, 8, 8, 200, 8, 400]  # each prompt is 24 tokens

    def jobs() -> list[Job]:
        return [
            Job(
                i,
                lambda s=s: vip.chat_inputs(messages_for(s, "{question}", [])),
                SamplingParams(max_tokens=b),
            )
            for i, (s, b) in enumerate(zip(samples, budgets, strict=True))
        ]

    grown = {a.key: (a.text, a.finish_reason) for a in engine_answers(vip, jobs(), batch_size=1)}
    assert sizes == [
        64,
        256,
        512,
    ]  # 24 + 8 in 64; 24 + 200 in twice 64 rounded up; 24 + 400 in the 512 context
    sizes.clear()
    whole = {a.key: (a.text, a.finish_reason) for a in engine_answers(vip, jobs(), batch_size=16)}
    assert sizes == [448] and grown == whole and len(whole) == 6  # all six seen at once: 24 + 400 in 448
    assert all(reason == "stop" for _, reason in whole.values())


def test_limit_and_resume(vip, count_data, tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    full = evaluate("vqav2", count_data, vip, prompt="{question}", limit=30, output=out, progress=False)
    assert len(full.samples) == 30 and full.answered == 30
    written = json.loads(out.read_text())
    assert written["complete"] and written["answered"] == 30 and written["scores"] == full.scores
    assert written["samples"][0].keys() >= {"id", "prompt", "output", "target", "score", "normalized"}
    again = evaluate("vqav2", count_data, vip, prompt="{question}", limit=30, output=out, progress=False)
    assert again.answered == 0 and again.scores == full.scores  # everything came from the file

    # a run killed after 7 answers leaves a partial file (saved as it goes, and on the way out) ...
    partial = tmp_path / "partial.json"
    real = eval_module.engine_answers

    def dies_after_seven(*args, **kwargs):
        for n, answer in enumerate(real(*args, **kwargs)):
            if n == 7:
                raise KeyboardInterrupt
            yield answer

    monkeypatch.setattr(eval_module, "engine_answers", dies_after_seven)
    with pytest.raises(KeyboardInterrupt):
        evaluate("vqav2", count_data, vip, prompt="{question}", limit=30, output=partial, progress=False)
    left = json.loads(partial.read_text())
    assert not left["complete"] and left["answered"] == 7 and left["scores"] is None
    monkeypatch.setattr(eval_module, "engine_answers", real)
    # ... which a rerun completes, asking only the 23 others, to the same answers and scores
    resumed = evaluate(
        "vqav2", count_data, vip, prompt="{question}", limit=30, output=partial, progress=False
    )
    assert resumed.answered == 23 and resumed.scores == full.scores
    assert [r["output"] for r in resumed.samples] == [r["output"] for r in full.samples]
    # a larger --limit on the same file asks only the new questions
    more = evaluate("vqav2", count_data, vip, prompt="{question}", limit=35, output=partial, progress=False)
    assert more.answered == 5 and len(more.samples) == 35
    with pytest.raises(ValueError, match="holds another evaluation .*settings"):
        evaluate("vqav2", count_data, vip, limit=30, output=partial, progress=False)  # another prompt
    with pytest.raises(ValueError, match="at least 1"):
        evaluate("vqav2", count_data, vip, limit=0, progress=False)


def test_command_line(count_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", "--task", "vqav2", "--data", str(count_data), "--limit", "12", "--prompt", "{question}",
                 "--batch-size", "4", "--output", str(out), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "vqav2 (demo): 12 questions" in printed and "accuracy: 100.00" in printed
    assert json.loads(out.read_text())["answered"] == 12
    code = main(["eval", "--task", "vqav2", "--data", str(tmp_path / "nothing"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no file or folder" in err and "v2_OpenEnded_mscoco_val2014_questions.json" in err
    code = main(["eval", "--task", "pope", "--data", str(count_data), "--shots", "2", "--no-progress"])
    assert code == 2 and "not evaluated few-shot" in capsys.readouterr().err


def test_quantized_model_through_the_command_line(count_data, tmp_path, capsys):
    out = tmp_path / "q.json"
    code = main(["eval", "--task", "vqav2", "--data", str(count_data), "--limit", "20", "--prompt", "{question}",
                 "--quantize", "int8", "--output", str(out), "--json", "--no-progress"])  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["accuracy"] == 100.0
    assert json.loads(out.read_text())["settings"]["quantize"] == "int8"


class Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: 1.0 when one of the ground truth's <OR> alternatives is in the prediction,
    and only when asked again with the evaluator's suffix: its first reply is not a number."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["max_tokens"] == 3 and body["model"] == "stub-judge"
        prompt = body["messages"][0]["content"]
        suffix = "\nPredict the correctness of the answer (digit): "
        question, truth, prediction, _ = prompt.removesuffix(suffix).splitlines()[-1].split(" | ")
        alternatives = [a.strip() for a in truth.split("<OR>")]
        content = "1.0" if any(a in prediction for a in alternatives) else "0.0"
        if not prompt.endswith(suffix):
            content = "Correct!"  # not a score: the grader asks again
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        return None


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_vipbench_answers_then_judged(vip, tmp_path, judge_url):
    write_vipbench(tmp_path / "ViP-Bench", 24)
    out = tmp_path / "human.json"
    # the human split's pictures as given: "What shape is inside the red rectangle?", the demo's known 100%
    first = evaluate("vipbench-human", tmp_path / "ViP-Bench", vip, output=out, progress=False)
    assert first.scores == {"answered": 24, "judged": 0}  # no judge: the answers wait for one
    answers = json.loads((tmp_path / "human-answers.json").read_text())
    assert list(answers) == [f"v1_{i}" for i in range(24)]  # the file the benchmark's evaluator takes
    judged = evaluate(
        "vipbench-human", tmp_path / "ViP-Bench", vip, output=out, judge_url=judge_url, judge_model="stub-judge",
        progress=False,
    )  # fmt: skip
    assert judged.answered == 0  # the answers came from the file; only the grading ran
    assert judged.scores["total"] == 100.0 and judged.scores["judged"] == 24
    assert set(judged.scores["by_capability"]) == {"rec", "spat"}
    assert all(r["judge"]["replies"][0] == "Correct!" for r in judged.samples)
    # the bbox split: rectangles drawn from the box annotations; its scores are the mean of its grades
    bbox = evaluate(
        "vipbench-bbox",
        tmp_path / "ViP-Bench",
        vip,
        judge_url=judge_url,
        judge_model="stub-judge",
        progress=False,
    )
    assert bbox.samples[0]["prompt"] == "What shape is within the red rectangle?"
    grades = [r["judge"]["score"] for r in bbox.samples]
    assert bbox.scores["total"] == pytest.approx(100 * sum(grades) / len(grades))
    with pytest.raises(ValueError, match="both --judge-url and --judge-model"):
        evaluate("vipbench-bbox", tmp_path / "ViP-Bench", vip, judge_url=judge_url, progress=False)


def test_idefics_few_shot_random_and_rices(idefics, tmp_path):
    examples = known_examples("idefics", "count")[:12]
    write_vqav2(tmp_path / "query", examples)
    write_vqav2(
        tmp_path / "support", known_examples("idefics", "count")[100:130] + examples[:4], first_id=1000
    )
    r = evaluate("vqav2", tmp_path / "query", idefics, shots=2, prompt="{question}", progress=False)
    query_ids = {s["id"] for s in r.samples}
    assert all(
        len(s["shots"]) == 2 and s["id"] not in s["shots"] and set(s["shots"]) <= query_ids for s in r.samples
    )
    rices = evaluate(
        "vqav2", tmp_path / "query", idefics, shots=3, shot_selection="rices", support=tmp_path / "support",
        prompt="{question}", progress=False,
    )  # fmt: skip
    # the support set holds the first four queries' own pictures (ids 6030-6033): each is its query's
    # nearest example by the model's picture features, placed last, next to the query
    for s in rices.samples[:4]:
        assert s["shots"][-1] == str(int(s["id"]) + 1030)
    assert all(len(s["shots"]) == 3 for s in rices.samples)
    assert rices.scores["accuracy"] >= 0  # scored like any run; the demo was trained zero-shot
