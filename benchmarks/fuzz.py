"""Fault and fuzz run over vlmlab's public surface (issue 14): bad images, damaged or foreign
journals, bad arguments (API, CLI, magics), edited plans, untrusted code, killed / stopped /
crashing workers. Every case is classified as

    ok               valid input, right answer
    clear error      bad input refused with a specific message (an exception of a user-error type,
                     an error row with its kind, a UsageError, CLI exit 2 with one line)
    crash            anything else raised (a raw KeyError, OSError, UnicodeEncodeError, ...)
    hang             still running after its deadline
    silently wrong   bad input accepted, or a wrong answer without a word
    lost/duplicated  rows missing from / repeated in a result or journal (worker cases)

    .venv/bin/python benchmarks/fuzz.py [--quick] > benchmarks/results/fuzz.txt

``--quick`` skips the worker cases (spawned processes: about a minute each on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

import vlmlab  # noqa: E402
from tests import badimages, fault_images  # noqa: E402

OK, CLEAR, CRASH, HANG, SILENT = "ok", "clear error", "crash", "hang", "silently wrong"
USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, LookupError, ImportError)
RESULTS: list[tuple[str, str, str, str]] = []  # (kind, case, outcome, detail)
LOSSES = Counter()  # "lost" / "duplicated" rows over the worker cases


def record(kind, case, outcome, detail=""):
    RESULTS.append((kind, case, outcome, " ".join(str(detail).split())[:160]))


def guarded(fn, seconds=60):
    """(hung, value, exception) of fn() run in a daemon thread."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - classified by the caller
            box["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return t.is_alive(), box.get("value"), box.get("error")


def expect_refusal(kind, case, fn, seconds=60, types=USER_ERRORS):
    """Bad input: a user-error exception with a message is clear; anything else is not."""
    hung, value, err = guarded(fn, seconds)
    if hung:
        return record(kind, case, HANG)
    if err is None:
        return record(kind, case, SILENT, f"accepted: {value!r}")
    from IPython.core.error import UsageError

    if isinstance(err, (*types, UsageError)) and str(err).strip() and type(err) is not KeyError:
        return record(kind, case, CLEAR, f"{type(err).__name__}: {err}")
    record(kind, case, CRASH, f"{type(err).__name__}: {err}")


def expect_ok(kind, case, fn, check=lambda v: True, seconds=120):
    hung, value, err = guarded(fn, seconds)
    if hung:
        return record(kind, case, HANG)
    if err is not None:
        return record(kind, case, CRASH, f"{type(err).__name__}: {err}")
    record(kind, case, OK if check(value) else SILENT, repr(value)[:160])


# ---- bad images ---------------------------------------------------------------------------------
def image_cases(tmp):
    broken = badimages.make_broken_zoo(tmp / "broken", fifo=True)
    valid = badimages.make_valid_zoo(tmp / "valid")
    inputs = {name: str(tmp / "broken" / name) for name in broken}
    wanted = dict(broken)
    for name in valid:
        inputs[name], wanted[name] = str(tmp / "valid" / name), None
    odd = tmp / "odd"
    odd.mkdir()
    extra = {
        os.fsdecode(b"caf\xe9.png"): None,  # not UTF-8
        "x" * 300 + ".png": "not_found",  # over NAME_MAX
        "/".join(["d" * 200] * 25) + "/x.png": "not_found",  # over PATH_MAX
        "loop.png": "broken_symlink",
        "id_rsa.png": "not_an_image",
        "photo.avif": "unsupported",
    }
    Image.new("RGB", (16, 16), "red").save(odd / os.fsdecode(b"caf\xe9.png"))
    os.symlink("loop.png", odd / "loop.png")
    (odd / "id_rsa.png").write_text("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAsecret\n")
    (odd / "photo.avif").write_bytes(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 32)
    for name, want in extra.items():
        inputs[name], wanted[name] = str(odd / name), want
    closed = Image.new("RGB", (8, 8))
    closed.close()
    inputs["closed PIL image"], wanted["closed PIL image"] = closed, "closed"
    inputs["URL"], wanted["URL"] = "https://example.com/cat.png", "is_a_url"
    for name, source in inputs.items():
        want = wanted[name]

        def run(source=source):
            return vlmlab.caption([source], progress=False)

        hung, result, err = guarded(run, 120)
        if hung:
            record("image", name, HANG)
        elif err is not None:
            record("image", name, CRASH, f"{type(err).__name__}: {err}")
        else:
            row = result.rows[0]
            secret = "secret" in str(row.get("error"))
            if len(result.rows) != 1 or secret:
                record("image", name, SILENT, f"{len(result.rows)} rows; quotes content: {secret}")
            elif want is None:
                record("image", name, OK if isinstance(row["caption"], str) and row["caption"] else SILENT,
                       row["caption"] or row["error"])
            elif row["error"] and row["error_kind"]:
                record("image", name, CLEAR, f"[{row['error_kind']}] {row['error']}")
            else:
                record("image", name, SILENT, f"captioned: {row['caption']!r}")


# ---- journals ----------------------------------------------------------------------------------
def journal_cases(tmp):
    good = tmp / "good.png"
    Image.new("RGB", (16, 16), "blue").save(good)
    first = tmp / "first.jsonl"
    vlmlab.caption(str(good), out=str(first), progress=False)
    row = json.loads(first.read_text().splitlines()[0])
    meta = {"model": row["model"], "prompt": row["prompt"]}

    def line(**kw):
        return json.dumps({"key": str(good), **meta, **kw})

    foreign = {  # files vlmlab did not write: refused, byte for byte unchanged
        "json without newline": b'{"a": 1}', "json line": b'{"a": 1}\n', "text": b"notes\n",
        "binary": bytes(range(256)), "csv": b"image,caption\nx.png,a cat\n", "json list": b"[1, 2]\n",
        "row then foreign": (line(caption="x") + '\n{"a": 1}').encode(),
        "garbage middle line": (line(caption="x") + "\nnot json\n" + line(caption="y") + "\n").encode(),
        "other model": json.dumps({"key": str(good), "model": "m", "prompt": "p", "caption": "c"}).encode() + b"\n",
    }
    for name, content in foreign.items():
        path = tmp / f"foreign-{len(content)}-{abs(hash(name))}.jsonl"
        path.write_bytes(content)
        expect_refusal("journal", name, lambda p=path: vlmlab.caption(str(good), out=str(p), progress=False))
        if path.read_bytes() != content:
            record("journal", name + " (file kept)", SILENT, "the file was changed")
    redo = {  # vlmlab rows that must be captioned again, or resumed
        "torn last line": (line(caption="x")[:-5], "redo"),
        "no caption": (line(), "redo"), "caption is a number": (line(caption=5, error=None), "redo"),
        "caption null": (line(caption=None, error=None), "redo"), "error row": (line(caption=None, error="e"), "redo"),
        "complete row, no newline": (line(caption="kept"), "resume"),
    }
    for name, (content, want) in redo.items():
        path = tmp / f"redo-{abs(hash(name))}.jsonl"
        path.write_text(content)

        def check(result, want=want):
            return len(result) == 1 and result.ok and result.resumed == (1 if want == "resume" else 0)

        expect_ok("journal", name, lambda p=path: vlmlab.caption(str(good), out=str(p), progress=False), check)
    specials = {"folder": tmp, "fifo": tmp / "fifo.jsonl", "/dev/null": Path("/dev/null")}
    os.mkfifo(specials["fifo"])
    for name, path in specials.items():
        expect_refusal("journal", f"out is a {name}", lambda p=path: vlmlab.caption(str(good), out=str(p),
                                                                                      progress=False), seconds=20)
    # /dev/zero would be read until memory runs out: a child process under a 2 GiB address-space limit
    code = ("import resource, vlmlab; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30));"
            f"vlmlab.caption({str(good)!r}, out='/dev/zero', progress=False)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        outcome = CLEAR if "regular file" in last else (SILENT if proc.returncode == 0 else CRASH)
        record("journal", "out is /dev/zero", outcome, last)
    except subprocess.TimeoutExpired:
        record("journal", "out is /dev/zero", HANG)
    # two runs on one journal
    blocking, gate = fault_images.waiting("fuzz-lock")
    shared = tmp / "shared.jsonl"
    t = threading.Thread(target=lambda: vlmlab.caption([blocking], out=str(shared), progress=False), daemon=True)
    t.start()
    time.sleep(0.5)
    expect_refusal("journal", "second run on a journal in use",
                   lambda: vlmlab.caption(str(good), out=str(shared), progress=False), seconds=30)
    gate.set()
    t.join(30)


# ---- arguments ---------------------------------------------------------------------------------
def argument_cases(tmp):
    good = tmp / "arg.png"
    Image.new("RGB", (16, 16), "green").save(good)
    img = str(good)
    api = {
        "batch_size=0": lambda: vlmlab.caption(img, batch_size=0, progress=False),
        "batch_size=-1": lambda: vlmlab.caption(img, batch_size=-1, progress=False),
        "batch_size=True": lambda: vlmlab.caption(img, batch_size=True, progress=False),
        "batch_size=1.5": lambda: vlmlab.caption(img, batch_size=1.5, progress=False),
        "batch_size='8'": lambda: vlmlab.caption(img, batch_size="8", progress=False),
        "max_new_tokens=0": lambda: vlmlab.caption(img, max_new_tokens=0, progress=False),
        "max_new_tokens=10**6": lambda: vlmlab.caption(img, max_new_tokens=10**6, progress=False),
        "prompt=5": lambda: vlmlab.caption(img, prompt=5, progress=False),
        "prompt of 5000 words": lambda: vlmlab.caption(img, prompt="word " * 5000, progress=False),
        "images=None": lambda: vlmlab.caption(None, progress=False),
        "images=5": lambda: vlmlab.caption(5, progress=False),
        "images={}": lambda: vlmlab.caption({}, progress=False),
        "images=''": lambda: vlmlab.caption("", progress=False),
        "images=['']": lambda: vlmlab.caption([""], progress=False),
        "images=[]": lambda: vlmlab.caption([], progress=False),
        "model=no-such-model": lambda: vlmlab.caption(img, model="no-such-model", progress=False),
        "dtype=float8": lambda: vlmlab.caption(img, dtype="float8", progress=False),
        "plan strategy=warp": lambda: vlmlab.plan(None, gpus="2x24GiB", strategy="warp"),
        "plan dtype=float8": lambda: vlmlab.plan(None, gpus="2x24GiB", dtype="float8"),
        "plan batch_size=True": lambda: vlmlab.plan(None, gpus="2x24GiB", batch_size=True),
        "plan batch_size=-5": lambda: vlmlab.plan(None, gpus="2x24GiB", batch_size=-5),
        "plan prompt_tokens=0": lambda: vlmlab.plan(None, gpus="2x24GiB", prompt_tokens=0),
        "plan gpus_per_replica=0": lambda: vlmlab.plan(None, gpus="2x24GiB", strategy="hybrid", gpus_per_replica=0),
        "plan device_map={'': 9}": lambda: vlmlab.plan(None, gpus="2x24GiB", device_map={"": 9}),
        "plan device_map={}": lambda: vlmlab.plan(None, gpus="2x24GiB", device_map={}),
        "plan model=no-such-model": lambda: vlmlab.plan("no-such-model", gpus="2x24GiB"),
        "plan 7B on 1x1GiB": lambda: vlmlab.plan("llava-1.5-7b", gpus="1GiB", strategy="single"),
        "load dtype=int8 (no bitsandbytes)": lambda: vlmlab.load(None, gpus="cpu", dtype="int8"),
        "unload no-such-model": lambda: vlmlab.unload("no-such-model"),
        "unload 5": lambda: vlmlab.unload(5),
        "select n=-1": lambda: vlmlab.gpus("2x24GiB").select(n=-1),
        "select n=0": lambda: vlmlab.gpus("2x24GiB").select(n=0),
        "select indices=[7]": lambda: vlmlab.gpus("2x24GiB").select(indices=[7]),
        "select min_free='lots'": lambda: vlmlab.gpus("2x24GiB").select(min_free="lots"),
    }
    for spec in ["h100-80gb,,", ",", "cpuxyz", "2x0.0001GiB", "999999xh100", "0xh100", "-1xh100", "h1000",
                 "24 GiB GiB", "2x", "x2", "cpu:0GiB", "2xcpu,h100", "nan GiB", "1e9GiB", ""]:
        api[f"gpus({spec!r})"] = lambda s=spec: vlmlab.gpus(s)
    for name, fn in api.items():
        if name == "images=[]":  # nothing to do is not an error: an empty result
            expect_ok("argument", name, fn, check=lambda v: len(v) == 0)
        else:
            expect_refusal("argument", name, fn)
    vlmlab.unload()
    # the CLI: exit 2 and one line on stderr
    from vlmlab.ui.cli import main

    for argv in (["caption", str(tmp / "no_such_dir") + "/"], ["caption", img, "--batch-size", "0"],
                 ["caption", img, "--gpus", "cpuxyz"], ["plan", "no-such-model"], ["plan", "llava-1.5-7b", "--gpus", ","],
                 ["plan", "llava-1.5-7b", "--strategy", "warp"], ["gpus", "h100,,"], ["frobnicate"],
                 ["caption", img, "--out", str(tmp)], ["caption", img, "--model", "no-such-model"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            hung, code, exc = guarded(lambda a=argv: main(a), 120)
        text = err.getvalue().strip()
        case = "vlmlab " + " ".join(a if len(a) < 40 else "..." for a in argv)
        if hung:
            record("cli", case, HANG)
        elif exc is not None:
            record("cli", case, CRASH, f"{type(exc).__name__}: {exc}")
        elif code == 2 and text.startswith("vlmlab: error:") and "\n" not in text and "Traceback" not in text:
            record("cli", case, CLEAR, text)
        else:
            record("cli", case, SILENT if code == 0 else CRASH, f"exit {code}: {text[:120]}")
    # the magics
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "vlmlab")
    shell.user_ns["box"] = "2x24GiB"
    for line in ["frobnicate", "plan no-such-model --gpus 2x24GiB", "unload no-such-model-x", "plan --batch-size 0",
                 "plan --strategy warp", "gpus cpuxyz", "gpus {box}", "gpus $box", "caption", "caption 'unclosed",
                 "load --gpus cpu --dtype int8", "plan --device-map '{bad json'", "help nothing", "gpus -n -1",
                 f"caption {tmp / 'no_such_dir'}/ --out {tmp}"]:
        def run(line=line):
            return shell.run_line_magic("vlm", line)

        if line.startswith("caption ") and "no_such_dir" in line:
            expect_refusal("magic", "%vlm caption missing/ --out FOLDER", run)
        else:
            expect_refusal("magic", "%vlm " + line, run)
    vlmlab.unload()


# ---- plans -------------------------------------------------------------------------------------
def plan_cases():
    base = json.loads(vlmlab.plan(None, gpus="2x24GiB", strategy="split", dtype="float32").to_json())

    def edited(change):
        d = json.loads(json.dumps(base))
        change(d)
        return json.dumps(d)

    dm = base["replicas"][0]["device_map"]
    vision, embed = next(k for k in dm if "vision" in k), next(k for k in dm if "embed" in k)
    edits = {
        "GPU 9": lambda d: d["replicas"][0]["device_map"].update({vision: 9}),
        "unknown module": lambda d: d["replicas"][0]["device_map"].update({"model.nope": 0}),
        "a module left out": lambda d: d["replicas"][0]["device_map"].pop(embed),
        "dtype float8": lambda d: d.update(dtype="float8"), "batch -5": lambda d: d["workload"].update(batch_size=-5),
        "strategy warp": lambda d: d.update(strategy="warp"), "no replicas": lambda d: d.update(replicas=[]),
        "device 'gpu'": lambda d: d["replicas"][0]["device_map"].update({vision: "gpu"}),
        "no hardware": lambda d: d["hardware"].update(devices=[]),
        "model missing": lambda d: d.pop("model"), "not a plan": lambda d: d.clear(),
    }

    def check(text):
        plan = vlmlab.Plan.from_json(text)
        plan.validate()
        return plan

    for name, change in edits.items():
        expect_refusal("plan json", name, lambda c=change: check(edited(c)))
    for name, text in {"truncated": json.dumps(base)[:50], "a list": "[1]", "empty file": ""}.items():
        expect_refusal("plan json", name, lambda t=text: check(t if t.startswith(("{", "[")) else "{" + t))
    expect_ok("plan json", "unedited round trip", lambda: check(json.dumps(base)), check=lambda p: p.ok)
    apart = edited(lambda d: d["replicas"][0]["device_map"].update({vision: 1 - dm[embed]}))
    expect_ok("plan json", "vision tower split off (transformers code: a warning)", lambda: check(apart),
              check=lambda p: any("vision" in w for w in p.warnings))


# ---- untrusted code ------------------------------------------------------------------------------
def untrusted_cases(tmp):
    sentinel = tmp / "code-ran"
    remote = tmp / "remote-model"
    remote.mkdir()
    config = json.loads((Path(vlmlab.spec(None).path) / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                    "from transformers import LlavaConfig as EvilConfig\n")
    pickled = tmp / "pickle-model"
    pickled.mkdir()
    (pickled / "config.json").write_text((Path(vlmlab.spec(None).path) / "config.json").read_text())

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    import pickle

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    good = tmp / "u.png"
    Image.new("RGB", (16, 16), "red").save(good)
    entries = {
        "spec(remote)": lambda: vlmlab.spec(str(remote)), "plan(remote)": lambda: vlmlab.plan(str(remote), gpus="cpu"),
        "load(remote)": lambda: vlmlab.load(str(remote), gpus="cpu"),
        "caption(model=remote)": lambda: vlmlab.caption(str(good), model=str(remote), progress=False),
        "load(pickle only)": lambda: vlmlab.load(str(pickled), gpus="cpu"),
        "caption(model=pickle only)": lambda: vlmlab.caption(str(good), model=str(pickled), progress=False),
    }
    for name, fn in entries.items():
        hung, value, err = guarded(fn, 120)
        if sentinel.exists():
            record("untrusted code", name, SILENT, "code ran without opt-in")
            sentinel.unlink()
        elif hung:
            record("untrusted code", name, HANG)
        else:
            record("untrusted code", name, CLEAR if err is not None else OK,
                   f"{type(err).__name__}: {err}" if err is not None else "nothing ran")
        vlmlab.unload()


# ---- workers -----------------------------------------------------------------------------------
def worker_cases(tmp):
    """Replicated runs on 2 CPU replicas: a worker SIGKILLed mid-run then resumed; a worker
    SIGSTOPped; an image that kills whichever worker opens it."""
    import multiprocessing as mp

    plan = vlmlab.plan(None, gpus="2xcpu", strategy="replicate", dtype="float32")
    paths = []
    for i in range(12):
        p = tmp / f"w{i:02d}.png"
        Image.new("RGB", (16, 16), (20 * i, 255 - 20 * i, 128)).save(p)
        paths.append(str(p))

    def count(case, keys, expected):
        c = Counter(keys)
        lost = sorted(set(expected) - set(c))
        dup = sorted(k for k, n in c.items() if n > 1)
        LOSSES["lost"] += len(lost)
        LOSSES["duplicated"] += len(dup)
        return lost, dup

    # SIGKILL a worker once it has finished two batches, then resume the journal
    out = tmp / "killed.jsonl"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            try:
                done = out.read_text().count("\n")
            except OSError:
                done = 0
            kids = mp.active_children()
            if done >= 2 and kids:
                os.kill(kids[0].pid, signal.SIGKILL)
                killed["pid"] = kids[0].pid
            time.sleep(0.05)

    threading.Thread(target=killer, daemon=True).start()
    hung, result, err = guarded(lambda: vlmlab.caption(paths, model=plan, batch_size=1, out=str(out),
                                                       progress=False), 400)
    if hung or err is not None:
        record("worker", "SIGKILL mid-run", HANG if hung else CRASH, err)
    else:
        again = vlmlab.caption(paths, model=plan, batch_size=1, out=str(out), progress=False)
        keys = [json.loads(x)["key"] for x in out.read_text().splitlines()]
        lost, dup = count("kill", keys, paths)
        ok = not lost and not dup and again.ok and again.resumed == len(paths) and "pid" in killed
        said = any("died" in w for w in result.warnings)
        record("worker", "SIGKILL mid-run, resume", OK if ok and said else SILENT,
               f"lost {lost}, duplicated {dup}, killed {killed}, reported: {said}")
    # SIGSTOP: the stopped worker's batch must go to the other one
    os.environ["VLMLAB_HANG_MIN_S"] = "8"
    marker = tmp / "stopped"
    images = [paths[0], fault_images.stop_once(marker), *paths[1:4]]
    hung, result, err = guarded(lambda: vlmlab.caption(images, model=plan, batch_size=1, progress=False), 300)
    if hung:
        for kid in mp.active_children():
            os.kill(kid.pid, signal.SIGCONT)
        record("worker", "SIGSTOP of a worker", HANG)
    elif err is not None:
        record("worker", "SIGSTOP of a worker", CRASH, f"{type(err).__name__}: {err}")
    else:
        lost, dup = count("stop", [r["image"] for r in result.rows if r["caption"]], paths[:4] + ["pil:1"])
        said = any("responding" in w for w in result.warnings)
        record("worker", "SIGSTOP of a worker", OK if not lost and not dup and said else SILENT,
               f"lost {lost}, duplicated {dup}, reported: {said}")
    # an image that kills every worker that opens it
    images = [paths[0], fault_images.crashing(), paths[1], paths[2]]
    hung, result, err = guarded(lambda: vlmlab.caption(images, model=plan, batch_size=2, progress=False), 400)
    if hung or err is not None:
        record("worker", "image that crashes its worker", HANG if hung else CRASH, err)
    else:
        good = [r["image"] for r in result.rows if r["caption"]]
        lost, dup = count("crash", good, paths[:3])
        bad = result.rows[1]
        ok = not lost and not dup and bad["error_kind"] == "crashed"
        record("worker", "image that crashes its worker", CLEAR if ok else SILENT,
               f"lost {lost}, duplicated {dup}, row: [{bad['error_kind']}] {bad['error']}")


def summary():
    by = Counter(o for _, _, o, _ in RESULTS)
    kinds = sorted({k for k, _, _, _ in RESULTS})
    print(f"\n{len(RESULTS)} cases of {len(kinds)} kinds: {', '.join(kinds)}")
    for kind in kinds:
        c = Counter(o for k, _, o, _ in RESULTS if k == kind)
        print(f"  {kind:<15} " + ", ".join(f"{n} {o}" for o, n in sorted(c.items())))
    print(f"\nok {by[OK]}, clear errors {by[CLEAR]}, crashes {by[CRASH]}, hangs {by[HANG]}, "
          f"silently wrong {by[SILENT]}, lost {LOSSES['lost']}, duplicated {LOSSES['duplicated']}")
    return by[CRASH] + by[HANG] + by[SILENT] + LOSSES["lost"] + LOSSES["duplicated"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the worker cases")
    args = parser.parse_args()
    t0 = time.time()
    print(f"vlmlab fuzz, {time.strftime('%Y-%m-%d %H:%M')} UTC, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPU cores, {'quick' if args.quick else 'full'}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        vlmlab.load()  # one loaded captioner for the in-process cases
        for name, fn in [("images", lambda: image_cases(tmp / "img")), ("journals", lambda: journal_cases(tmp)),
                         ("arguments", lambda: argument_cases(tmp)), ("plans", plan_cases),
                         ("untrusted", lambda: untrusted_cases(tmp))] + (
                            [] if args.quick else [("workers", lambda: worker_cases(tmp))]):
            (tmp / "img").mkdir(exist_ok=True)
            if name == "arguments":
                vlmlab.unload()
            fn()
            if not vlmlab.loaded():
                vlmlab.load()
    for kind, case, outcome, detail in RESULTS:  # every case, with what happened
        print(f"{outcome:>15}  {kind}: {ascii(case)[1:-1][:70]}  {ascii(detail)[1:-1][:110]}")
    bad = summary()
    print(f"{time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
