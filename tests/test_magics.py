"""``%vlm`` / ``%%vlm`` through a real IPython InteractiveShell."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import vlmlab  # noqa: E402
from vlmlab.ui import magics  # noqa: E402
from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL  # noqa: E402
from vlmlab.assets import SAMPLES_DIR

HAVE_CAPTIONER = (BUNDLED[DEFAULT_MODEL] / "config.json").is_file()
SAMPLES = SAMPLES_DIR
needs_captioner = pytest.mark.skipif(not HAVE_CAPTIONER, reason="the bundled captioner (vlmlab/models/tiny-captioner) "
                                     "is not trained yet: scripts/train_captioner.py")


def _api_has(name):
    try:
        getattr(vlmlab, name)
        return True
    except (AttributeError, ImportError):
        return False


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    if "vlmlab" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "vlmlab")
    magic = shell.magics_manager.registry["VlmMagic"]
    yield shell
    magic.default_model = magic.dtype = magic.batch_size = None
    magic.poll_interval = 1.0
    for name in ("x", "hw", "p", "res", "board", "m"):
        shell.user_ns.pop(name, None)


@pytest.fixture
def record(monkeypatch):
    """Replace an API function by a recorder: the magic's parsing is checked without running a model."""
    calls = []

    def replace(name):
        def fake(*args, **kwargs):
            calls.append((name, args, kwargs))
            return f"{name} result"

        monkeypatch.setattr(vlmlab, name, fake, raising=False)
        return calls

    return replace


# ---- loading the extension ----------------------------------------------------------------------

def test_load_ext_is_fast_and_imports_no_torch_in_a_fresh_kernel():
    code = textwrap.dedent("""
        import sys, time
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        t = time.perf_counter()
        shell.run_line_magic("load_ext", "vlmlab")
        took = time.perf_counter() - t
        shell.run_line_magic("vlm", "help")
        hw = shell.run_line_magic("vlm", "gpus 2x24GiB")
        heavy = [m for m in ("torch", "transformers", "ipywidgets", "accelerate") if m in sys.modules]
        print("RESULT", took, len(hw), ",".join(heavy) or "-")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    took, n, heavy = out.stdout.split("RESULT")[1].split()
    assert heavy == "-", f"%load_ext vlmlab imported {heavy}"
    assert float(took) < 1.0
    assert n == "2"


def test_loading_twice_registers_once(ip):
    vlmlab.load_ipython_extension(ip)
    ip.run_line_magic("load_ext", "vlmlab")
    magic = ip.magics_manager.registry["VlmMagic"]
    assert sum(isinstance(c, magics.VlmMagic) for c in ip.configurables) == 1
    assert ip.magics_manager.magics["line"]["vlm"].__self__ is magic
    assert ip.magics_manager.magics["cell"]["vlm"].__self__ is magic


def test_unload_ext_unregisters_and_reload_works(ip):
    ip.run_line_magic("unload_ext", "vlmlab")
    assert "vlm" not in ip.magics_manager.magics["line"]
    assert "vlm" not in ip.magics_manager.magics["cell"]
    assert "VlmMagic" not in ip.magics_manager.registry
    assert not any(isinstance(c, magics.VlmMagic) for c in ip.configurables)
    with pytest.raises(UsageError):
        ip.run_line_magic("vlm", "help")
    ip.run_line_magic("load_ext", "vlmlab")
    assert ip.run_line_magic("vlm", "gpus a100-40gb")[0].name == "A100 40GB"


def test_unload_ext_closes_dashboards_and_stops_their_monitor(ip):
    pytest.importorskip("ipywidgets")
    if importlib.util.find_spec("vlmlab.observe.profiler") is None:
        pytest.skip("vlmlab.observe (MemorySampler) is not there yet")
    board = ip.run_line_magic("vlm", "dashboard")
    board.monitor.interval = 0.05
    board.monitor.start()
    assert board.monitor.running
    ip.run_line_magic("unload_ext", "vlmlab")
    assert not board.monitor.running
    ip.run_line_magic("load_ext", "vlmlab")


# ---- usage --------------------------------------------------------------------------------------

@pytest.mark.parametrize("line", ["", "--help", "-h", "help"])
def test_usage(ip, capsys, line):
    assert ip.run_line_magic("vlm", line) is None
    out = capsys.readouterr().out
    assert out.startswith("%vlm SUBCOMMAND")
    for sub in magics.SUBCOMMANDS:
        assert f"\n  {sub}" in out


@pytest.mark.parametrize("sub", sorted(magics.SUBCOMMANDS))
def test_help_for_each_subcommand(ip, capsys, sub):
    assert ip.run_line_magic("vlm", f"help {sub}") is None
    text = capsys.readouterr().out
    assert text.startswith(f"usage: %vlm {sub}")
    assert ip.run_line_magic("vlm", f"{sub} --help") is None  # argparse's exit(0) intercepted
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("line, says", [
    ("plann", "Did you mean 'plan'"),
    ("plan --batch-size 0", "--batch-size: expected a positive integer, got '0'"),
    ("plan --batch-size many", "expected a positive integer, got 'many'"),
    ("plan --strategy sideways", "invalid choice: 'sideways'"),
    ("plan --no-such-flag", "unrecognized arguments: --no-such-flag"),
    ("plan a b", "unrecognized arguments: b"),
    ("plan --device-map {oops", "not valid JSON"),
    ("plan --device-map missing.json", "neither JSON nor a file"),
    ("plan --device-map []", "neither JSON nor a file"),
    ('plan "unbalanced', "No closing quotation"),
    ("plan --gpus 2x24GiB --dtype fp7", "unknown dtype 'fp7'"),
    ("plan llava-1.5-7b --gpus 1x4GiB --strategy single", "does not fit"),
    ("gpus 2xbanana", "unknown GPU 'banana'"),
    ("help plann", "no subcommand 'plann'"),
    ("caption", "which images?"),
    ("caption --prompt-from-body x.png", "cell body; it is empty"),
    ("load --plan nothing_here", "no variable 'nothing_here'"),
    ("loaded -o 1x", "not a valid variable name"),
    ("plan llava-1.5-7b --gpus 1x4GiB -o class", "not a valid variable name"),  # checked before planning
])
def test_bad_arguments_raise_usage_error(ip, line, says):
    with pytest.raises(UsageError, match=None) as info:
        ip.run_line_magic("vlm", line)
    assert says in str(info.value)


def test_usage_error_in_a_cell_is_shown_not_raised(ip, capsys):
    result = ip.run_cell("%vlm plan --batch-size 0")
    assert isinstance(result.error_in_exec, UsageError)
    assert not isinstance(result.error_in_exec, SystemExit)
    text = capsys.readouterr()
    assert "UsageError" in text.out + text.err and "Traceback" not in text.out + text.err


def test_a_body_where_none_is_taken(ip):
    with pytest.raises(UsageError, match="takes no cell body"):
        ip.run_cell_magic("vlm", "gpus", "2x24GiB\n")


# ---- gpus, plan ---------------------------------------------------------------------------------

def test_gpus(ip):
    hw = ip.run_line_magic("vlm", "gpus 2x24GiB")
    assert hw == vlmlab.gpus("2x24GiB")
    mixed = ip.run_line_magic("vlm", "gpus a100-40gb,h100-80gb,rtx3090 --min-free 30GiB")
    assert [g.name for g in mixed] == ["A100 40GB", "H100 80GB"]
    assert [g.name for g in ip.run_line_magic("vlm", "gpus a100-40gb,h100-80gb,rtx3090 -n 1")] == ["H100 80GB"]
    here = ip.run_line_magic("vlm", "gpus")
    assert here == vlmlab.gpus()


def test_plan_equals_the_api(ip):
    p = ip.run_line_magic("vlm", "plan llava-1.5-7b --gpus 2x24GiB --strategy split --dtype bfloat16 --batch-size 16")
    q = vlmlab.plan("llava-1.5-7b", gpus="2x24GiB", strategy="split", dtype="bfloat16", batch_size=16)
    assert p.device_map == q.device_map and p.memory == q.memory and p.strategy == "split"
    assert p == q


def test_plan_flags_reach_the_api(ip, record):
    calls = record("plan")
    ip.run_line_magic("vlm", "plan qwen2-vl-7b --gpus 0,2 --strategy hybrid --gpus-per-replica 2 "
                             "--max-new-tokens 32 --prompt-tokens 8 --trust-remote-code --dtype int8")
    assert calls[-1] == ("plan", (), dict(model="qwen2-vl-7b", gpus=[0, 2], strategy="hybrid", gpus_per_replica=2,
                                          max_new_tokens=32, prompt_tokens=8, trust_remote_code=True, dtype="int8"))
    ip.run_line_magic("vlm", "plan")  # nothing given: nothing passed, the API's defaults hold
    assert calls[-1] == ("plan", (), {})


def test_image_size_flag_reaches_plan_and_bench(ip, record):
    plans, benches = record("plan"), record("bench")
    ip.run_line_magic("vlm", "plan qwen2-vl-2b --image-size 448x448")
    assert plans[-1] == ("plan", (), dict(model="qwen2-vl-2b", image_size=(448, 448)))
    ip.run_line_magic("vlm", "bench qwen2-vl-2b --random-weights --image-size 640X480")
    assert benches[-1][2]["image_size"] == (640, 480)
    with pytest.raises(UsageError, match="WIDTHxHEIGHT"):
        ip.run_line_magic("vlm", "plan qwen2-vl-2b --image-size 448")


def test_plan_device_map_from_flag_file_and_cell_body(ip, tmp_path):
    dm = {"": 0}
    by_flag = ip.run_line_magic("vlm", f"plan llava-1.5-7b --gpus 1x24GiB --device-map '{json.dumps(dm)}'")
    assert by_flag.strategy == "custom" and by_flag.device_map == dm
    f = tmp_path / "map.json"
    f.write_text(json.dumps(dm))
    assert ip.run_line_magic("vlm", f"plan llava-1.5-7b --gpus 1x24GiB --device-map {f}").device_map == dm
    saved = tmp_path / "plan.json"
    by_flag.to_json(saved)  # a saved Plan: its first replica's map
    assert ip.run_line_magic("vlm", f"plan llava-1.5-7b --gpus 1x24GiB --device-map {saved}").device_map == dm
    by_body = ip.run_cell_magic("vlm", "plan llava-1.5-7b --gpus 1x24GiB", json.dumps(dm))
    assert by_body.device_map == dm
    with pytest.raises(UsageError, match="not both"):
        ip.run_cell_magic("vlm", f"plan --device-map {f}", json.dumps(dm))
    with pytest.raises(UsageError, match="should be a device map"):
        ip.run_cell_magic("vlm", "plan", "not json")


def test_broken_device_map_is_a_usage_error_with_the_problems(ip):
    # lm_head unmapped (a vision tower on another GPU is only a warning for transformers' own LLaVA)
    dm = {"model.vision_tower": 1, "model.multi_modal_projector": 0, "model.language_model": 0}
    with pytest.raises(UsageError, match="not covered by the device map: 'lm_head'"):
        ip.run_line_magic("vlm", f"plan llava-1.5-7b --gpus 2x24GiB --device-map '{json.dumps(dm)}'")


# ---- results: -o, _, settings -------------------------------------------------------------------

def test_output_variable_and_underscore(ip):
    hw = ip.run_line_magic("vlm", "gpus 2x24GiB -o hw")
    assert ip.user_ns["hw"] is hw
    ip.run_cell("%vlm gpus 4xh200")
    assert len(ip.user_ns["_"]) == 4
    ip.run_cell("%vlm plan llava-1.5-7b --gpus 2x24GiB -o p")
    assert ip.user_ns["_"] is ip.user_ns["p"]


def test_settings_apply_when_the_flag_is_not_given(ip, record):
    calls = record("plan")
    ip.run_line_magic("config", "VlmMagic.default_model = 'llava-1.5-7b'")
    ip.run_line_magic("config", "VlmMagic.dtype = 'float16'")
    ip.run_line_magic("config", "VlmMagic.batch_size = 4")
    ip.run_line_magic("vlm", "plan --gpus 2x24GiB")
    assert calls[-1][2] == dict(model="llava-1.5-7b", dtype="float16", batch_size=4, gpus="2x24GiB")
    ip.run_line_magic("vlm", "plan qwen2-vl-2b --dtype float32 --batch-size 2")
    assert calls[-1][2] == dict(model="qwen2-vl-2b", dtype="float32", batch_size=2)
    assert ip.run_line_magic("config", "VlmMagic.batch_size") == 4


def test_settings_from_the_shell_config():
    from traitlets.config import Config

    cfg = Config()
    cfg.VlmMagic.dtype = "float32"
    cfg.VlmMagic.poll_interval = 0.25
    magic = magics.VlmMagic(shell=InteractiveShell.instance(), config=cfg)
    assert (magic.dtype, magic.poll_interval) == ("float32", 0.25)


def test_settings_are_listed_by_config(ip, capsys):
    ip.run_line_magic("config", "VlmMagic")
    out = capsys.readouterr().out
    for trait in ("default_model", "dtype", "batch_size", "poll_interval"):
        assert f"VlmMagic.{trait}" in out


# ---- load, loaded, unload ----------------------------------------------------------------------

def test_load_flags_and_plan_variable(ip, record):
    calls = record("load")
    ip.run_line_magic("vlm", "load smolvlm-256m --random-weights --force --allow-pickle --gpus 2xcpu "
                             "--strategy replicate --replica 1 --dtype float32")
    assert calls[-1][2] == dict(model="smolvlm-256m", random_weights=True, force=True, allow_pickle=True,
                                gpus="2xcpu", strategy="replicate", replica=1, dtype="float32")
    ip.user_ns["p"] = plan = vlmlab.plan("llava-1.5-7b", gpus="1x24GiB")
    ip.run_line_magic("config", "VlmMagic.default_model = 'qwen2-vl-2b'")  # a --plan names its own model
    ip.run_line_magic("vlm", "load --plan p")
    assert calls[-1][2] == dict(model=plan)
    with pytest.raises(UsageError, match="not both"):
        ip.run_line_magic("vlm", "load llava-1.5-7b --plan p")


def test_unload_and_loaded_route_to_the_api(ip, record):
    calls = record("unload")
    record("loaded")
    assert ip.run_line_magic("vlm", "unload llava-1.5-7b") == "unload result"
    assert calls[-1] == ("unload", ("llava-1.5-7b",), {})
    ip.run_line_magic("vlm", "unload")
    assert calls[-1] == ("unload", (None,), {})
    assert ip.run_line_magic("vlm", "loaded -o x") == "loaded result" == ip.user_ns["x"]


@needs_captioner
def test_load_loaded_unload_for_real(ip):
    vlmlab.unload()
    m = ip.run_line_magic("vlm", "load -o m")
    assert ip.user_ns["m"] is m and m.name == DEFAULT_MODEL
    assert ip.run_line_magic("vlm", "loaded") == [m]
    with pytest.raises(UsageError, match="already loaded"):
        ip.run_line_magic("vlm", "load")
    again = ip.run_line_magic("vlm", "load --force")
    assert ip.run_line_magic("vlm", "loaded") == [m, again]
    assert ip.run_line_magic("vlm", f"unload {DEFAULT_MODEL}") == 2
    assert ip.run_line_magic("vlm", "loaded") == []


# ---- caption ------------------------------------------------------------------------------------

def test_caption_flags_and_body_rules(ip, record):
    calls = record("caption")
    ip.run_line_magic("vlm", "caption a.png --model m --prompt 'what is it?' --batch-size 2 --max-new-tokens 9 "
                             "--out run.jsonl --no-resume --gpus 0 --dtype float16 --no-progress --profile")
    assert calls[-1][1:] == (("a.png",), dict(model="m", prompt="what is it?", batch_size=2, max_new_tokens=9,
                                               out="run.jsonl", resume=False, gpus=[0], dtype="float16",
                                               progress=False, profile=True))
    ip.run_line_magic("vlm", "caption a.png folder/")
    assert calls[-1][1:] == ((["a.png", "folder/"],), {})
    ip.run_cell_magic("vlm", "caption first.png", "# a comment\nsecond.png\n\n  third dir/ \n")
    assert calls[-1][1] == (["first.png", "second.png", "third dir/"],)
    ip.run_cell_magic("vlm", "caption --prompt-from-body x.png y.png", "\nWhat colour is the square?\n")
    assert calls[-1][1:] == ((["x.png", "y.png"],), dict(prompt="What colour is the square?"))
    with pytest.raises(UsageError, match="not both"):
        ip.run_cell_magic("vlm", "caption --prompt-from-body --prompt hi x.png", "body")
    with pytest.raises(UsageError, match="give the images on the %%vlm line"):
        ip.run_cell_magic("vlm", "caption --prompt-from-body", "What is it?")
    ip.run_line_magic("config", "VlmMagic.default_model = 'qwen2-vl-2b'")
    ip.run_line_magic("vlm", "caption a.png")
    assert calls[-1][2] == dict(model="qwen2-vl-2b")


@needs_captioner
def test_caption_for_real(ip, tmp_path):
    images = sorted(SAMPLES.glob("*.png"))[:3]
    assert images, "no bundled sample images"
    res = ip.run_line_magic("vlm", f"caption {images[0]} {images[1]} --no-progress --out {tmp_path / 'j.jsonl'} -o res")
    assert ip.user_ns["res"] is res and len(res) == 2 and res.ok and all(res.captions.values())
    body = "\n".join(str(p) for p in images)
    res = ip.run_cell_magic("vlm", f"caption --no-progress --out {tmp_path / 'j.jsonl'}", body)
    assert len(res) == 3 and res.resumed == 2
    html = res._repr_html_()
    assert all(c in html for c in res.captions.values())


# ---- profile, bench, dashboard -----------------------------------------------------------------

def test_profile_and_bench_flags(ip, record):
    calls = record("profile")
    record("bench")
    ip.run_line_magic("vlm", "profile llava-1.5-7b --images a.png --gpus 2xcpu --strategy split --batch-size 2 "
                             "--random-weights")
    assert calls[-1][2] == dict(model="llava-1.5-7b", images="a.png", gpus="2xcpu", strategy="split",
                                batch_size=2, random_weights=True)
    ip.run_line_magic("vlm", "bench llava-1.5-7b --strategies single,split --batch-sizes 1,8 --gpus 2x24GiB")
    assert calls[-1] == ("bench", (), dict(model="llava-1.5-7b", strategies=["single", "split"],
                                           batch_sizes=[1, 8], gpus="2x24GiB"))
    with pytest.raises(UsageError, match="--batch-sizes"):
        ip.run_line_magic("vlm", "bench --batch-sizes 1,x")


@needs_captioner
@pytest.mark.skipif(not _api_has("profile"), reason="vlmlab.profile() is not there yet")
def test_profile_for_real(ip):
    result = ip.run_line_magic("vlm", f"profile --images {SAMPLES} --batch-size 2 -o x")
    assert ip.user_ns["x"] is result


@needs_captioner
@pytest.mark.skipif(not _api_has("bench"), reason="vlmlab.bench() is not there yet")
def test_bench_for_real(ip):
    result = ip.run_line_magic("vlm", "bench --strategies single --batch-sizes 1,2 -o x")
    assert ip.user_ns["x"] is result


def test_dashboard(ip):
    pytest.importorskip("ipywidgets")
    ip.run_line_magic("config", "VlmMagic.poll_interval = 0.5")
    board = ip.run_line_magic("vlm", "dashboard llava-1.5-7b --gpus 2x24GiB --dtype float16 --batch-size 4 -o board")
    try:
        assert ip.user_ns["board"] is board
        assert board.monitor.interval == 0.5
        assert board.planner.model.value == "llava-1.5-7b"
        assert (board.planner.dtype.value, board.planner.batch_size.value) == ("float16", 4)
        assert board.gpus.virtual.value == "2x24GiB"
        assert "application/vnd.jupyter.widget-view+json" in board._repr_mimebundle_()
    finally:
        board.close()
