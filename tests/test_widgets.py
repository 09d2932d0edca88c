"""The dashboard, headless: widget state and callbacks (``button.click()``, setting values)."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("ipywidgets")

import vlmlab  # noqa: E402
from vlmlab.hardware import GiB, Gpu, Hardware  # noqa: E402
from vlmlab.run.results import CaptionResult  # noqa: E402
from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL  # noqa: E402
from vlmlab.assets import SAMPLES_DIR
from vlmlab.ui.widgets import Dashboard, GpuPicker, MemoryMonitor, close_all  # noqa: E402

HAVE_CAPTIONER = (BUNDLED[DEFAULT_MODEL] / "config.json").is_file()
SAMPLES = SAMPLES_DIR
PNG = b"\x89PNG"


def box(*free_gib, util=None):
    """A pretend real machine (as NVML would report it)."""
    return Hardware([Gpu(i, "NVIDIA H100 80GB HBM3", 80 * GiB, int(f * GiB), kind="cuda", utilization=util, nvml_index=i)
                     for i, f in enumerate(free_gib)], "nvml")


def monitor_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("vlmlab-monitor", "vlmlab-memory-sampler"))]


@pytest.fixture
def board():
    b = vlmlab.dashboard(gpus="2x24GiB", poll_interval=0.05)
    yield b
    b.close()


@pytest.fixture
def fake_caption(monkeypatch):
    """vlmlab.caption replaced by a recorder that captions by file name."""
    calls = []

    def caption(images, **kwargs):
        images = [images] if isinstance(images, str) else list(images)
        calls.append((images, kwargs))
        rows = [{"image": p, "caption": f"a caption of {p.rsplit('/', 1)[-1]}", "error": None, "error_kind": None,
                 "n_tokens": 4, "latency_ms": 1.0, "batch_size": len(images), "device": "cpu"} for p in images]
        return CaptionResult(rows, model="fake", prompt=kwargs.get("prompt"), elapsed_s=0.5)

    monkeypatch.setattr(vlmlab, "caption", caption)
    return calls


def test_structure(board):
    assert board.tabs.titles == ("GPUs", "Plan", "Caption", "Monitor", "Latency")
    assert list(board.tabs.children) == [board.gpus.widget, board.planner.widget, board.captioner.widget,
                                         board.monitor.widget, board.latency.widget]
    assert board.widget.children == (board.header, board.tabs)
    bundle = board._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == board.widget.model_id
    for name in ("source", "checks", "rows", "min_free", "virtual", "refresh_button", "message", "summary"):
        assert hasattr(board.gpus, name), name
    for name in ("model", "strategy", "dtype", "batch_size", "max_new_tokens", "plan_button", "bars", "table", "notes",
                 "layers_first", "layers_last", "layers_to", "move_layers_button", "module", "module_to",
                 "move_module_button"):
        assert hasattr(board.planner, name), name
    for name in ("images", "upload", "prompt", "out", "profile", "run_button", "progress", "status", "gallery"):
        assert hasattr(board.captioner, name), name
    for name in ("start_button", "pause_button", "stop_button", "plot", "status"):
        assert hasattr(board.monitor, name), name
    assert hasattr(board.latency, "plot") and hasattr(board.latency, "message")
    classes = {"vlmlab-dashboard": board.widget, "vlmlab-gpu-picker": board.gpus.widget,
               "vlmlab-plan-editor": board.planner.widget, "vlmlab-plan-bars": board.planner.bars,
               "vlmlab-caption-panel": board.captioner.widget, "vlmlab-caption-gallery": board.captioner.gallery,
               "vlmlab-memory-monitor": board.monitor.widget, "vlmlab-memory-plot": board.monitor.plot,
               "vlmlab-latency-view": board.latency.widget}
    for css, widget in classes.items():
        assert css in widget._dom_classes, css
    assert DEFAULT_MODEL in board.planner.model.options and "llava-1.5-7b" in board.planner.model.options


def test_dashboard_imports_no_torch_and_monitors_without_cuda():
    code = textwrap.dedent("""
        import sys, time, vlmlab
        b = vlmlab.dashboard(poll_interval=0.05)
        b.monitor.start(); time.sleep(0.3); b.monitor.stop()
        n = len(b.monitor.samples())
        b.close()
        print("RESULT", n, ",".join(m for m in ("torch", "transformers") if m in sys.modules) or "-")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, heavy = out.stdout.split("RESULT")[1].split()
    assert int(n) >= 2 and heavy == "-"


# ---- GPU picker ---------------------------------------------------------------------------------

def test_gpu_picker_selects_real_gpus():
    seen = []
    picker = GpuPicker(machine=box(70, 10, 50, util=12), on_change=seen.append)
    assert picker.source.value == "machine"
    assert len(picker.rows.children) == 3 and [c.description for c in picker.checks] == ["GPU0", "GPU1", "GPU2"]
    labels = [lab.value for lab in picker.rows.children[0].children[1:]]
    assert labels == ["NVIDIA H100 80GB HBM3", "70.0 / 80.0 GiB free", "12% busy"]
    assert [g.index for g in picker.hardware] == [0, 1, 2]
    picker.checks[1].value = False
    assert [g.index for g in picker.hardware] == [0, 2] and [g.index for g in seen[-1]] == [0, 2]
    picker.checks[1].value = True
    picker.min_free.value = 40
    assert [g.index for g in picker.hardware] == [0, 2]
    assert "selected 2 device(s)" in picker.summary.value
    assert picker.runnable == picker.hardware


def test_gpu_picker_virtual_box_and_errors():
    picker = GpuPicker(machine=box(70), spec="a100-40gb,rtx3090")
    assert picker.source.value == "virtual"
    assert [g.name for g in picker.hardware] == ["A100 40GB", "GeForce RTX 3090"]
    assert picker.runnable is None  # a virtual box is for planning, not running
    picker.virtual.value = "2xbanana"
    assert "unknown GPU" in picker.summary.value
    with pytest.raises(ValueError):
        picker.hardware
    picker.virtual.value = "2xcpu"
    assert picker.runnable is not None and picker.runnable.is_cpu
    picker.source.value = "machine"
    assert picker.rows.layout.display is None and picker.virtual.layout.display == "none"


def test_gpu_picker_without_gpus_says_so_and_defaults_to_a_virtual_box():
    picker = GpuPicker(machine=Hardware([], "none", "No GPU found on this machine: no driver."))
    assert picker.source.value == "virtual" and picker.virtual.value == "2x24GiB"
    assert "No GPU found" in picker.message.value
    assert len(picker.hardware) == 2
    picker.source.value = "machine"
    assert not picker.hardware and "No GPU found" in picker.summary.value


def test_dashboard_gpus_argument(monkeypatch):
    b = Dashboard(gpus=box(70, 60, 50))
    try:
        assert b.gpus.source.value == "machine" and len(b.gpus.checks) == 3
    finally:
        b.close()
    real = vlmlab.gpus
    monkeypatch.setattr(vlmlab, "gpus", lambda spec=None: box(70, 60, 50) if spec is None else real(spec))
    b = Dashboard(gpus=[0, 2])
    try:
        assert [c.value for c in b.gpus.checks] == [True, False, True]
        assert [g.index for g in b.gpus.hardware] == [0, 2] and b._monitored() == [0, 2]
        b.gpus.source.value = "virtual"
        assert b._monitored() == []  # a virtual box is not watched: the monitor falls back to "cpu"
    finally:
        b.close()


# ---- plan view and editor -----------------------------------------------------------------------

def test_plan_button_shows_bars_and_stores_the_plan(board):
    p = board.planner
    p.model.value, p.strategy.value, p.dtype.value, p.batch_size.value = "llava-1.5-7b", "split", "bfloat16", 16
    seen = []
    p.on_plan(seen.append)
    p.plan_button.click()
    expected = vlmlab.plan("llava-1.5-7b", gpus="2x24GiB", strategy="split", dtype="bfloat16", batch_size=16)
    assert p.plan == expected and seen == [p.plan]
    assert p.bars.value.tobytes().startswith(PNG)
    assert "layers 0–" in p.table.value and "GPU1" in p.table.value
    assert "ok: Plan(llava-1.5-7b, split" in p.notes.value and "split makes the model fit" in p.notes.value
    assert p.layers_to.options == (("GPU0", 0), ("GPU1", 1)) and "model.vision_tower" in p.module.options
    assert p.layers_last.max == 31 and not p.move_layers_button.disabled
    assert "Plan(llava-1.5-7b, split" in board.header.value


def test_plan_that_does_not_fit_shows_why(board):
    p = board.planner
    board.gpus.virtual.value = "1x4GiB"
    p.model.value, p.strategy.value = "llava-1.5-7b", "single"
    p.plan_button.click()
    assert p.plan is None
    assert "PlanError" in p.notes.value and "does not fit" in p.notes.value


def test_move_layers_and_module(board):
    p = board.planner
    p.model.value, p.strategy.value = "llava-1.5-7b", "split"
    p.plan_button.click()
    before = p.plan
    p.layers_first.value, p.layers_last.value, p.layers_to.value = 0, 3, 1
    p.move_layers_button.click()
    assert p.plan is not before and p.plan.ok
    assert all(p.plan.device_map[f"model.language_model.layers.{i}"] == 1 for i in range(4))
    assert p.plan == before.move(layers=range(0, 4), to=1)
    p.module.value, p.module_to.value = "model.vision_tower", 1
    p.move_module_button.click()  # the vision tower away from projector and embeddings
    # transformers' LLaVA moves the image features itself: a warning with the copy's size, not a problem
    assert p.plan.ok and p.plan.device_map["model.vision_tower"] == 1
    assert "on different devices" in p.notes.value and "moves the image features" in p.notes.value
    assert "PROBLEMS" not in board.header.value


def test_move_controls_refuse_nonsense(board):
    p = board.planner
    p.move_module_button.click()
    assert "make a plan first" in p.notes.value
    p.model.value = "llava-1.5-7b"
    p.plan_button.click()
    plan = p.plan
    p.layers_first.value, p.layers_last.value = 1, 0
    p.move_layers_button.click()
    assert "comes before the first" in p.notes.value and p.plan is plan
    p.module.value = "no.such.module"
    p.move_module_button.click()
    assert "Error" in p.notes.value and p.plan is plan


# ---- caption panel ------------------------------------------------------------------------------

def _images(folder, n):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"im{i}.png")
    return folder


def test_caption_run_in_batches_moves_the_progress_bar(board, fake_caption, tmp_path):
    c = board.captioner
    c.images.value = str(_images(tmp_path / "imgs", 5))
    c.prompt.value = "what is it?"
    board.planner.batch_size.value = 2
    progress = []
    c.progress.observe(lambda ch: progress.append(ch["new"]), names="value")
    results = []
    c.on_result(results.append)
    c.run_button.click()
    assert [len(images) for images, _ in fake_caption] == [2, 2, 1]
    kwargs = fake_caption[0][1]
    assert kwargs["prompt"] == "what is it?" and kwargs["batch_size"] == 2 and kwargs["progress"] is False
    assert kwargs["model"] == DEFAULT_MODEL and "gpus" not in kwargs  # a virtual box: run on this machine
    assert progress[-1] == c.progress.max == 5 and 2 in progress and 4 in progress
    assert c.progress.bar_style == "success" and c.progress.description == "5/5"
    assert len(c.result) == 5 and results == [c.result]
    assert all(f"a caption of im{i}.png" in c.gallery.value for i in range(5))
    assert "5 captioned" in c.status.value and not c.run_button.disabled


def test_caption_uses_a_runnable_plan(board, fake_caption, tmp_path):
    board.gpus.virtual.value = "2xcpu"
    board.planner.model.value = "smolvlm-256m"
    board.planner.plan_button.click()
    assert board.planner.plan.ok
    board.captioner.images.value = str(_images(tmp_path / "imgs", 1))
    board.captioner.run_button.click()
    assert fake_caption[-1][1]["model"] is board.planner.plan


def test_caption_uploads_and_errors(board, fake_caption, tmp_path):
    c = board.captioner
    c.images.value = ""
    c.run_button.click()
    assert "no images" in c.status.value and c.progress.bar_style == "danger"
    c.images.value = str(tmp_path / "missing")
    png = (_images(tmp_path / "up", 1) / "im0.png").read_bytes()
    c.upload.value = ({"name": "up.png", "type": "image/png", "size": len(png), "content": memoryview(png),
                       "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    c.images.value = ""
    c.run_button.click()
    (sent, _), = fake_caption
    assert sent[0].endswith("up.png")
    assert "a caption of up.png" in c.gallery.value
    folder = c._upload_dir
    board.close()
    assert not os.path.exists(folder)


def test_caption_with_profile_feeds_the_latency_view(board, monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    class FakeProfile:
        def plot_latency(self):
            fig = Figure()
            fig.add_subplot().bar(["prefill"], [1.0])
            return fig

        def __repr__(self):
            return "Profile(fake)"

    def caption(images, **kwargs):
        assert kwargs["profile"] is True and len(images) == 3  # one call: one profile
        rows = [{"image": p, "caption": "x", "error": None} for p in images]
        return CaptionResult(rows, model="fake", profile=FakeProfile())

    monkeypatch.setattr(vlmlab, "caption", caption)
    board.captioner.images.value = str(_images(tmp_path / "imgs", 3))
    board.captioner.profile.value = True
    board.captioner.run_button.click()
    assert board.latency.plot.value.tobytes().startswith(PNG) and "Profile(fake)" in board.latency.message.value


@pytest.mark.skipif(not HAVE_CAPTIONER, reason="the bundled captioner (vlmlab/models/tiny-captioner) is not trained "
                    "yet: scripts/train_captioner.py")
def test_caption_the_bundled_samples_for_real(board):
    c = board.captioner
    assert c.images.value == str(SAMPLES)
    board.planner.batch_size.value = 4
    c.profile.value = True
    c.run_button.click()
    assert c.result is not None, c.status.value
    assert c.result.ok and len(c.result) == len(list(SAMPLES.glob("*.png")))
    assert all(caption and caption in c.gallery.value for caption in c.result.captions.values())
    assert board.latency.plot.value.tobytes().startswith(PNG)


# ---- live memory monitor ------------------------------------------------------------------------

def _wait(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_monitor_starts_pauses_stops_and_collects_samples(board):
    m = board.monitor
    assert not m.running and m.samples() is None
    m.start_button.click()
    assert m.running and m.start_button.disabled and not m.stop_button.disabled
    assert m.sampler.devices == ["cpu"]  # no GPU here: the kernel's own memory
    assert _wait(lambda: len(m.samples()) >= 3 and m.plot.value.tobytes().startswith(PNG))
    assert m.samples()["rss"].notna().all()
    m.pause_button.click()
    assert m.paused and m.pause_button.description == "Resume"
    n = len(m.samples())
    time.sleep(0.2)
    assert len(m.samples()) <= n + 1
    m.pause_button.click()
    assert not m.paused and _wait(lambda: len(m.samples()) > n + 1)
    m.stop_button.click()
    assert not m.running and not m.sampler.running and not monitor_threads()
    assert not m.start_button.disabled and m.stop_button.disabled


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no NVML here: the GPU rows are empty
def test_monitor_samples_the_selected_gpus():
    m = MemoryMonitor(devices=lambda: [0, 1], interval=0.05)
    try:
        m.start()
        assert m.sampler.devices == [0, 1]
    finally:
        m.stop()
    assert not monitor_threads()


def test_close_leaves_no_thread_behind():
    boards = [vlmlab.dashboard(poll_interval=0.05) for _ in range(2)]
    for b in boards:
        b.monitor.start()
    assert len(monitor_threads()) == 4
    boards[0].close()
    assert len(monitor_threads()) == 2
    close_all()  # what %unload_ext vlmlab does
    assert not monitor_threads()
    assert boards[1].widget.comm is None  # closed


def test_dtype_auto_is_shown_and_leaves_the_dtype_to_the_api(board):
    assert board.planner.dtype.value == "auto" and board.planner.dtype.label == "auto"
    assert board.planner.plan is None  # no plan on screen: the Caption tab runs the model by name
    assert board._caption_settings()["dtype"] is None
    board.planner.dtype.value = "float32"
    assert board._caption_settings()["dtype"] == "float32"
