"""``vlmlab``: the command line, a thin skin over the Python API.

    vlmlab caption PATH... [--model M] [--out captions.jsonl] [--batch-size N] [--prompt P]
                           [--max-new-tokens N] [--no-resume] [--gpus SPEC] [--dtype D]
    vlmlab demo [--out-dir DIR]        the bundled captioner on the bundled samples, on CPU; a plan picture
    vlmlab gpus [SPEC]                 this machine's GPUs, or a virtual box ('2x24GiB')
    vlmlab plan MODEL [--gpus SPEC] [--strategy S] [--dtype D] [--batch-size N] [--max-new-tokens N]
                      [--json FILE] [--picture FILE]

Exit codes: 0 done; 1 some inputs could not be captioned (each has a row with its error); 2 bad input
(a one-line error on stderr, no traceback); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vlmlab.ui.argtypes import positive_int

USAGE_ERRORS = (ValueError, TypeError, KeyError, LookupError, OSError, ImportError, RuntimeError)
DEMO_MODEL, DEMO_GPUS, DEMO_STRATEGY = "llava-1.5-7b", "2x24GiB", "split"
DEMO_BATCH, DEMO_NEW_TOKENS = 16, 32  # the README picture's workload


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlmlab", description="A lab bench for vision-language models on one or many GPUs.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("caption", help="caption image files or folders")
    c.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    c.add_argument("--model", default=None, help="a model name or folder (default: the bundled tiny captioner)")
    c.add_argument("--out", default=None, help="JSONL journal, appended per batch; a rerun resumes it")
    c.add_argument("--batch-size", type=positive_int, default=8)
    c.add_argument("--prompt", default=None, help="the question (default: the model family's captioning prompt)")
    c.add_argument("--max-new-tokens", type=positive_int, default=None)
    c.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to continue an existing journal instead of resuming it")
    c.add_argument("--gpus", default=None, help="GPU indices ('0,1') or 'cpu' (default: this machine)")
    c.add_argument("--dtype", default=None, help="float32, bfloat16, float16, int8, int4")
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", help="caption the bundled samples on CPU, show the GPUs, plan a 7B model")
    d.add_argument("--out-dir", default="vlmlab-demo", help="where the plan picture goes (default: vlmlab-demo)")

    g = sub.add_parser("gpus", help="list this machine's GPUs, or a virtual box")
    g.add_argument("spec", nargs="?", default=None, help="e.g. 2x24GiB, a100-40gb,a100-40gb, 2xcpu")

    pl = sub.add_parser("plan", help="place a model on GPUs and predict memory per device")
    pl.add_argument("model", help="a catalogue name (e.g. llava-1.5-7b), a folder or a Hub id")
    pl.add_argument("--gpus", default=None, help="a virtual box ('2x24GiB') or indices ('0,1'); default: this machine")
    pl.add_argument("--strategy", default="auto", help="auto, single, split, replicate, hybrid")
    pl.add_argument("--dtype", default=None, help="default: bfloat16 on GPUs, float32 on CPU")
    pl.add_argument("--batch-size", type=positive_int, default=1)
    pl.add_argument("--max-new-tokens", type=positive_int, default=64)
    pl.add_argument("--gpus-per-replica", type=positive_int, default=None)
    pl.add_argument("--json", default=None, metavar="FILE", help="save the plan as JSON")
    pl.add_argument("--picture", default=None, metavar="FILE", help="save the plan as a picture (.png, .svg)")
    return p


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some images failed, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help / --version
            return int(exit_.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        return {"caption": _caption, "demo": _demo, "gpus": _gpus, "plan": _plan}[args.command](args)
    except KeyboardInterrupt:
        print("vlmlab: interrupted", file=sys.stderr)
        return 130
    except (UsageError, *USAGE_ERRORS) as err:
        print(f"vlmlab: error: {_one_line(err)}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------ commands
def _caption(args) -> int:
    import os

    import vlmlab

    from vlmlab.run.images import IMAGE_EXTENSIONS

    # a missing folder is bad input, said before any model loads; a missing image file gets an error row
    missing = [p for p in args.paths if not os.path.lexists(p) and "://" not in p
               and (p.endswith(("/", os.sep)) or Path(p).suffix.lower() not in IMAGE_EXTENSIONS)]
    if missing:
        raise UsageError(f"no such folder: {_printable(missing[0])}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    result = vlmlab.caption(args.paths, model=args.model, prompt=args.prompt, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, out=args.out, resume=args.resume,
                            gpus=_gpu_arg(args.gpus), dtype=args.dtype, progress=not args.quiet)
    _print_rows(result.rows, base=_common_root(r["image"] for r in result.rows))
    print(result.summary() + (f"; journal: {args.out}" if args.out else ""))
    if result.errors:
        print(f"vlmlab: {len(result.errors)} input(s) could not be captioned (see the error column)", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    import json

    import vlmlab
    from vlmlab.assets import SAMPLES_DIR

    t0 = time.perf_counter()
    out_dir = Path(args.out_dir)
    refs_file = SAMPLES_DIR / "captions.json"
    if not refs_file.exists():
        raise FileNotFoundError(f"the bundled samples are missing from {SAMPLES_DIR}; reinstall vlmlab")
    refs = json.loads(refs_file.read_text())
    images = [SAMPLES_DIR / name for name in sorted(refs)]

    print(f"1. Captioning {len(images)} bundled sample images with {vlmlab.DEFAULT_MODEL} on the CPU")
    result = vlmlab.caption(images, model=None, gpus="cpu", progress=False)
    width = max(len(p.name) for p in images)
    print(f"   {'image':<{width}}  {'caption':<36} {'latency':>9}  reference")
    for path, row in zip(images, result.rows):
        ref = refs[path.name]
        mark = "=" if row["caption"] == ref else "≠"
        shown = row["caption"] if row["caption"] is not None else f"ERROR {row['error_kind']}"
        print(f"   {path.name:<{width}}  {shown:<36} {_ms(row['latency_ms']):>9}  {mark} {ref}")
    same = sum(r["caption"] == refs[p.name] for p, r in zip(images, result.rows))
    print(f"   {same}/{len(images)} captions match the reference; {result.summary()}")

    print("\n2. GPUs on this machine")
    print(_indent(_hardware_text(vlmlab.gpus())))

    print(f"\n3. Planning {DEMO_MODEL} on a virtual {DEMO_GPUS} box, strategy {DEMO_STRATEGY}, "
          f"batch {DEMO_BATCH}, {DEMO_NEW_TOKENS} new tokens")
    plan = vlmlab.plan(DEMO_MODEL, gpus=DEMO_GPUS, strategy=DEMO_STRATEGY, dtype="bfloat16", batch_size=DEMO_BATCH,
                       max_new_tokens=DEMO_NEW_TOKENS)
    print(_indent(_plan_text(plan)))
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = out_dir / f"plan-{DEMO_MODEL}-{DEMO_GPUS}.png"
    plan.save_picture(picture)
    print(f"   picture: {picture}")
    print(f"\ndemo done in {time.perf_counter() - t0:.1f} s")
    return 0


def _gpus(args) -> int:
    import vlmlab

    print(_hardware_text(vlmlab.gpus(args.spec)))
    return 0


def _plan(args) -> int:
    import vlmlab

    plan = vlmlab.plan(args.model, gpus=_gpu_arg(args.gpus), strategy=args.strategy, dtype=args.dtype,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       gpus_per_replica=args.gpus_per_replica)
    print(_plan_text(plan))
    if args.json:
        plan.to_json(args.json)
        print(f"plan saved to {args.json}")
    if args.picture:
        plan.save_picture(args.picture)
        print(f"picture saved to {args.picture}")
    return 0


# ------------------------------------------------------------------------------------- helpers
def _gpu_arg(text):
    """'0,1' -> [0, 1] (this machine's GPUs); anything else is a hardware spec or None."""
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",")]
    if all(t.isdigit() for t in parts):
        return [int(t) for t in parts]
    return text


def _hardware_text(hw) -> str:
    if not hw:
        return hw.message
    from vlmlab.hardware import fmt_bytes

    lines = [f"{len(hw)} device(s) ({hw.source})"]
    for g in hw:
        extra = "" if g.utilization is None else f", {g.utilization:.0f}% busy"
        lines.append(f"  {g.label}: {g.name}, {fmt_bytes(g.free)} free of {fmt_bytes(g.total)}{extra}")
    return "\n".join(lines)


def _plan_text(plan) -> str:
    from vlmlab.hardware import fmt_bytes

    lines = [repr(plan)]
    width = max((len(w) for w, _ in plan.summary()), default=0)
    lines += [f"  {what:<{width}}  {where}" for what, where in plan.summary()]
    for i, need in plan.predicted().items():
        g = plan.hardware.by_index(i)
        lines.append(f"  {g.label}: predicted peak {fmt_bytes(need)} of {fmt_bytes(g.free)} "
                     f"({100 * need / g.free:.0f}%)" if g.free else f"  {g.label}: {fmt_bytes(need)}")
    lines += [f"  problem: {p}" for p in plan.problems] + [f"  note: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _print_rows(rows, base=""):
    names = [_printable(r["image"][len(base):] if base else r["image"]) for r in rows]
    width = min(max((len(n) for n in names), default=5), 60)
    print(f"{'image':<{width}}  {'latency':>9}  caption")
    for name, r in zip(names, rows):
        text = r["caption"] if not r["error"] else f"ERROR [{r['error_kind']}] {r['error'].removeprefix(r['image'] + ': ')}"
        print(f"{name:<{width}}  {_ms(r['latency_ms']):>9}  {_printable(str(text))}")


def _common_root(keys) -> str:
    import os

    keys = list(keys)
    if len(keys) < 2:
        return ""
    root = os.path.commonpath(keys) if all(os.path.isabs(k) == os.path.isabs(keys[0]) for k in keys) else ""
    return root + os.sep if root and root != os.sep and all(k.startswith(root + os.sep) for k in keys) else ""


def _printable(name: str) -> str:
    """A path as text any terminal takes: bytes that are not UTF-8 shown as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ms(value) -> str:
    return "" if value is None else f"{value:.0f} ms"


def _indent(text, pad="   ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def _one_line(err) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    msg = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
    return msg or type(err).__name__


def _version() -> str:
    from vlmlab import __version__

    return f"vlmlab {__version__}"


if __name__ == "__main__":
    sys.exit(main())
