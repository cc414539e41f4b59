"""Fuzzing, bounded for CI (about 2 minutes in all): the atheris targets (picture decoding, visual-prompt
drawing, chat-template rendering, the incremental decoder), a schemathesis + hypothesis campaign against a
running server, and hypothesis properties of the CLI's picture functions and the training-data reader.

The same code runs long campaigns (fuzz/README.md); VLMKIT_FUZZ_SECONDS and VLMKIT_FUZZ_REQUESTS scale
the CI runs up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_serve import free_port

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import campaign  # noqa: E402
import strategies  # noqa: E402

from vlmkit.cli import prompted_images  # noqa: E402
from vlmkit.models import builtin_model, load_processor  # noqa: E402
from vlmkit.train.data import load_conversations  # noqa: E402
from vlmkit.visual_prompts import draw_visual_prompts  # noqa: E402

SECONDS = int(os.environ.get("VLMKIT_FUZZ_SECONDS", "12"))
REQUESTS = int(os.environ.get("VLMKIT_FUZZ_REQUESTS", "400"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("target", ["picture", "draw", "chat_template", "decoder"])
def test_atheris_target_finds_nothing(target, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if target == "picture":
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.argv=['x']; sys.path.insert(0, {str(FUZZ)!r}); "
                f"import targets; targets.seed_pictures({str(corpus)!r})",
            ],
            check=True,
            env=ENV,
        )
    flags = [
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={tmp_path}/",
    ]
    run = subprocess.run(
        [sys.executable, str(FUZZ / "targets.py"), target, str(corpus), *flags],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", run.stderr)
    assert done and int(done.group(1)) > 1000, run.stderr[-2000:]  # it really ran, and fast enough to matter


def test_server_campaign_no_5xx_health_within_a_second_each_request_ends_once(tmp_path):
    port = free_port()
    proc = campaign.start_server("demo", port, [], tmp_path / "server.log")
    try:
        report = campaign.run_campaign(f"http://127.0.0.1:{port}", requests=REQUESTS, seed=0)
    finally:
        proc.terminate()
        proc.wait(60)
    log = (tmp_path / "server.log").read_text()
    assert report.ok, report.failures[:10]
    assert report.requests >= REQUESTS * 0.9 and report.health_polls > 5
    assert set(report.statuses) >= {"200", "400"}  # both accepted and refused requests were made
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def picture_files(tmp_path_factory):
    return tmp_path_factory.mktemp("pictures")


@PROPERTY
@given(data=strategies.pictures(), prompts=st.lists(strategies.visual_prompts(), max_size=3))
def test_cli_pictures_and_visual_prompts_load_or_say_why(picture_files, data, prompts):
    """`vlmkit generate --image FILE --visual-prompt JSON`: the picture with its prompts drawn, or a
    ValueError naming what is wrong with the file or the prompt."""
    path = picture_files / "picture"
    path.write_bytes(data)
    try:
        images = prompted_images([str(path)], [json.dumps(prompts)])
    except ValueError as e:
        assert str(e) and ("picture" in str(e) or "image" in str(e) or "visual prompt" in str(e)), e
        return
    assert len(images) == 1 and images[0].width * images[0].height > 0


@PROPERTY
@given(spec=strategies.visual_prompts(json_only=False), w=st.integers(1, 300), h=st.integers(1, 300))
def test_python_api_visual_prompts_draw_or_refuse(spec, w, h):
    """NaN, infinities and junk through the Python API: a drawn picture of the same size, or a ValueError."""
    try:
        out = draw_visual_prompts(Image.new("RGB", (w, h), "white"), [spec], seed=1)
    except ValueError as e:
        assert str(e).startswith("visual prompt 0:"), e
        return
    assert out.size == (w, h)


@pytest.fixture(scope="module")
def training_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    Image.new("RGB", (40, 30), "red").save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def processors():
    return [load_processor(builtin_model(name)) for name in ("demo", "demo-idefics")]


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_training_rows_are_kept_or_skipped_and_counted(training_folder, processors, data):
    """Any JSONL file: every row is either a sample or a counted skip with its reason; the reader never
    stops on a row (on_bad_sample='skip')."""
    names = ["good.png", "broken.png", "empty.jpg", "missing.png", "/etc/passwd"]
    rows = data.draw(st.lists(strategies.training_rows(names), min_size=1, max_size=6))
    path = training_folder / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    processor = data.draw(st.sampled_from(processors))
    samples, report = load_conversations(path, processor, max_length=256, on_bad_sample="skip")
    nonblank = sum(1 for row in rows if row.strip())
    assert report.total == nonblank and report.kept == len(samples)
    assert report.kept + sum(len(rows) for rows in report.skipped.values()) == report.total
