"""Issue 14, item 8 (and 17, 19, 20): replicated runs start their workers from anywhere.

A script fed on stdin (``python - <<EOF``) and a script without an ``if __name__ == "__main__"``
guard both run a 2-replica CPU plan; the workers must never re-run the user's main module. The
same runs check that every replica gets work (17), that the progress bar shows the start-up phases
and no transformers "Loading weights" bars (19), and that rows name their replica (20).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlmlab

pytestmark = pytest.mark.slow

PACKAGE_ROOT = str(Path(vlmlab.__file__).resolve().parents[1])

SCRIPT = """\
import json, sys
from PIL import Image
import vlmlab

paths = []
for i, colour in enumerate(["red", "green", "blue", "white"]):
    Image.new("RGB", (16, 16), colour).save(f"img{i}.png")
    paths.append(f"img{i}.png")
plan = vlmlab.plan(None, gpus="2xcpu", strategy="replicate", dtype="float32")
result = vlmlab.caption(paths, model=plan, batch_size=8, progress=True)
print("RESULT " + json.dumps({"captions": len(result.captions), "rows": len(result.rows),
                              "replicas": sorted({r.get("replica") for r in result.rows}, key=str)}))
"""


def _run(args, tmp_path, **kw):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, VLMLAB_PIN_WORKERS="0")
    env.pop("PYTHONIOENCODING", None)
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, **kw)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[0][7:]), proc.stderr


def _check(summary, stderr):
    assert summary["captions"] == summary["rows"] == 4
    assert summary["replicas"] == [0, 1], summary  # 4 images at batch 8 still reach both replicas (17, 20)
    assert "Loading weights" not in stderr  # one vlmlab bar, not transformers' bars (19)
    assert "loading" in stderr  # the bar says what the workers are doing while they start (19)


def test_8_workers_start_from_a_script_on_stdin(tmp_path):
    summary, stderr = _run([sys.executable, "-"], tmp_path, input=SCRIPT)
    _check(summary, stderr)


def test_8_workers_start_from_a_script_without_a_main_guard(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT)
    summary, stderr = _run([sys.executable, str(script)], tmp_path)
    _check(summary, stderr)  # a worker that re-ran the script would print a second RESULT line
