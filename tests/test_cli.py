"""The ``vlmlab`` command line: each subcommand through ``main([...])``, and one real ``vlmlab demo``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vlmlab
from vlmlab.assets import scenes as synth
from vlmlab.assets import SAMPLES_DIR
from vlmlab.ui.cli import main
from vlmlab.run.journal import Journal
from vlmlab.run.loading import loaded
from vlmlab.plan.plan import Plan
from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
needs_bundled = pytest.mark.skipif(not (BUNDLED[DEFAULT_MODEL] / "config.json").exists(),
                                   reason="the bundled captioner is not trained yet (scripts/train_captioner.py)")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-scenes")
    for i, (im, _, _) in enumerate(synth.make_dataset(5, seed=99)):
        im.save(folder / f"s{i}.png")
    return folder


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmlab: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------- gpus
def test_gpus_virtual_box(capsys):
    assert main(["gpus", "2x24GiB"]) == 0
    out = capsys.readouterr().out
    assert "2 device(s) (virtual)" in out and "GPU1: virtual 24 GiB, 24.0 GiB free of 24.0 GiB" in out


def test_gpus_this_machine(capsys):
    assert main(["gpus"]) == 0
    out = capsys.readouterr().out.strip()
    hw = vlmlab.gpus()
    assert (f"{len(hw)} device(s)" in out) if hw else out == hw.message


def test_gpus_bad_spec(capsys):
    assert main(["gpus", "2xbanana"]) == 2
    assert "unknown GPU 'banana'" in _one_line_error(capsys)


# ------------------------------------------------------------------------------------- plan
def test_plan_split_with_json_and_picture(tmp_path, capsys):
    js, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(["plan", "llava-1.5-7b", "--gpus", "2x24GiB", "--strategy", "split", "--dtype", "bfloat16",
               "--batch-size", "4", "--max-new-tokens", "32", "--json", str(js), "--picture", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Plan(llava-1.5-7b, split, bfloat16, batch 4" in out and "GPU0: predicted peak" in out
    assert "layers 0–" in out and f"plan saved to {js}" in out
    plan = Plan.from_json(js)
    assert plan.strategy == "split" and plan.batch_size == 4 and plan.max_new_tokens == 32
    assert len(plan.replicas) == 1 and plan.replicas[0].gpus == [0, 1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_that_does_not_fit_is_one_line(capsys):
    assert main(["plan", "llava-1.5-7b", "--gpus", "8GiB", "--strategy", "single", "--dtype", "bfloat16"]) == 2
    err = _one_line_error(capsys)
    assert "does not fit" in err and "What would make it fit" in err


@pytest.mark.parametrize("argv, needle", [
    (["plan", "no-such-model-xyz"], "not a folder nor a catalogue model"),
    (["plan", "llava-1.5-7b", "--gpus", "2x24GiB", "--strategy", "sideways"], "unknown strategy"),
    (["plan", "llava-1.5-7b", "--gpus", "2x24GiB", "--dtype", "fp7"], "fp7"),
    (["plan", "llava-1.5-7b", "--batch-size", "0"], "positive integer"),
    (["plan"], "required: model"),
    (["fly"], "invalid choice: 'fly'"),
    (["caption"], "required: PATH"),
    (["caption", "x.png", "--batch-size", "two"], "positive integer"),
])
def test_bad_input_is_a_one_line_error_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in _one_line_error(capsys)


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "caption" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert main([]) == 2


# ---------------------------------------------------------------------------------- caption
@needs_bundled
def test_caption_with_journal_resume_and_no_resume(lm, scenes, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    argv = ["caption", str(scenes), "--out", str(out), "--batch-size", "2", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert len(loaded()) == 1 and loaded()[0] is lm  # reused the loaded copy
    rows = Journal(out).rows()
    assert len(rows) == 5 and all(r["caption"] for r in rows)
    for r in rows:
        assert f"{Path(r['key']).name}" in text and r["caption"] in text
    assert "5 image(s): 5 captioned, 0 error(s)" in text

    assert main(argv) == 0  # resumes: nothing left to do
    assert "5 from the journal" in capsys.readouterr().out
    assert len(Journal(out).rows()) == 5

    assert main(argv + ["--no-resume"]) == 2
    err = _one_line_error(capsys)
    assert "delete it" in err and "resume=True" in err


@needs_bundled
def test_caption_prompt_and_max_new_tokens(lm, scenes, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(scenes / "s0.png"), "--prompt", "caption", "--max-new-tokens", "2",
                 "--out", str(out), "--quiet"]) == 0
    row = Journal(out).rows()[0]
    assert row["prompt"] == "caption" and row["n_tokens"] <= 2


@needs_bundled
def test_caption_with_broken_inputs_exits_1(lm, scenes, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    rc = main(["caption", str(scenes / "s1.png"), str(tmp_path / "notes.png"), str(tmp_path / "gone.jpg"),
               "--quiet"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "ERROR [not_an_image]" in captured.out and "ERROR [not_found]" in captured.out
    assert "2 input(s) could not be captioned" in captured.err


def test_caption_of_an_empty_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["caption", str(tmp_path)]) == 2
    assert "No images found" in _one_line_error(capsys)


# ------------------------------------------------------------------------------------- demo
@needs_bundled
def test_demo_runs_for_real(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlmlab.ui.cli", "demo", "--out-dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    wall = time.perf_counter() - t0
    print(f"\nvlmlab demo wall time: {wall:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    refs = json.loads((SAMPLES_DIR / "captions.json").read_text())
    for name in refs:
        assert name in out
    assert "captions match the reference" in out
    matched = int(out.split("/8 captions match")[0].rsplit(None, 1)[-1]) if "/8 captions match" in out else 0
    assert matched >= 6, out
    assert "GPUs on this machine" in out and "Plan(llava-1.5-7b, split" in out
    picture = tmp_path / "demo" / "plan-llava-1.5-7b-2x24GiB.png"
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert wall < 60, f"the demo took {wall:.0f} s"
