"""Issue 14, items 16, 18, 21: what a user notices in a notebook (bench, CPU plans, the README)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

import vlmlab

README = Path(__file__).resolve().parents[1] / "README.md"


def _cli(argv):
    """The ``vlmlab`` console script's main(argv) -> exit code."""
    from vlmlab.ui.cli import main

    return main(argv)


# ---- 16. bench compares like with like, and says when a run is too short -----------------------------

@pytest.mark.slow
def test_16_bench_on_cpu_runs_single_in_a_worker_too_and_flags_short_runs(tmp_path):
    images = []
    for i, colour in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        images.append(str(tmp_path / f"{i}.png"))
    result = vlmlab.bench(strategies=["single"], batch_sizes=[2], gpus="2xcpu", images=images, progress=False)
    (row,) = result.rows
    assert row["in_worker"] is True, row  # as replicate's replicas are: a fresh process each
    assert any("too short" in w for w in result.warnings), result.warnings


# ---- 18. CPU plans ----------------------------------------------------------------------------------

def test_18_a_cpu_plan_loads_what_it_says_and_names_cpu_devices():
    plan = vlmlab.plan(None, gpus="2xcpu", strategy="replicate")
    assert plan.dtype == "float32"  # what CPU workers load; bfloat16 is the default on GPUs only
    page = plan._repr_html_()
    assert "GPU0" not in page and "GPU1" not in page and "cpu0" in page and "cpu1" in page
    assert vlmlab.plan(None, gpus="2x24GiB").dtype == "bfloat16"


def test_18_profile_on_cpu_shows_no_prediction_error(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    prof = vlmlab.profile(None, images=str(tmp_path / "a.png"), gpus="cpu", batch_size=1, progress=False)
    assert prof.error_pct() == {}  # the memory model predicts GPU memory, not a process's RSS
    devices = prof.to_pandas()["devices"]
    assert devices["error_pct"].isna().all()
    vlmlab.unload()


# ---- 21. the README's CLI plan example prints the numbers the README states --------------------------

def test_21_readme_plan_numbers_match_what_its_cli_example_prints(capsys):
    text = README.read_text()
    (command,) = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.startswith("vlmlab plan ")]
    argv = shlex.split(command)[1:]
    for flag in ("--picture", "--json"):  # files the example would write
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    assert _cli(argv) == 0
    printed = [float(x) for x in re.findall(r"predicted peak ([\d.]+) GiB", capsys.readouterr().out)]
    stated = re.search(r"predicted\s+peak to ([\d.]+) and ([\d.]+) GiB", text)
    assert stated, "the README no longer states the plan's predicted peaks"
    assert printed == [float(stated.group(1)), float(stated.group(2))], (command, printed, stated.group(0))
