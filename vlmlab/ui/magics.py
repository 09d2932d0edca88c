"""``%vlm`` and ``%%vlm``: IPython magics over the vlmlab API.

A skin: each subcommand parses its flags, calls the one API function of the same name
(``%vlm plan`` -> ``vlmlab.plan``) and returns the result, so it displays and lands in ``_``.
Flags mirror the API keywords (``--batch-size`` -> ``batch_size``); a flag not given is not
passed, so the API's own defaults apply, unless a setting (``%config VlmMagic.dtype = ...``)
says otherwise. Bad arguments raise ``UsageError`` (argparse's exits are intercepted).

Loading this module imports IPython only: never torch, never ipywidgets.
"""
from __future__ import annotations

import argparse
import difflib
import json
import keyword
import os
import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from traitlets import Float, Int, Unicode

from vlmlab.ui.argtypes import image_size, path_as_typed, positive_int

STRATEGIES = ("auto", "single", "split", "replicate", "hybrid")  # validated again by the API

USAGE = """\
%vlm SUBCOMMAND [ARGS] [-o VAR]      a lab bench for vision-language models

  gpus [SPEC]          this machine's GPUs, or a virtual box ('2x24GiB', 'a100-40gb')  -> vlmlab.gpus
  plan [MODEL]         place a model on GPUs, predict memory per device                 -> vlmlab.plan
  load [MODEL]         load a model by a plan (or --plan VAR)                           -> vlmlab.load
  unload [MODEL]       unload a model (all models when none is named)                   -> vlmlab.unload
  loaded               what is loaded where                                             -> vlmlab.loaded
  caption [IMAGES...]  caption image files / folders                                    -> vlmlab.caption
  profile [MODEL]      measure memory and latency of a captioning run                   -> vlmlab.profile
  bench [MODEL]        compare strategies and batch sizes                               -> vlmlab.bench
  dashboard [MODEL]    the widget dashboard                                             -> vlmlab.dashboard
  help [SUBCOMMAND]    this text, or one subcommand's flags

Every subcommand takes -o VAR (store the result in the variable VAR). Flags mirror the API's
keywords: --gpus, --strategy, --dtype, --batch-size, --max-new-tokens, --gpus-per-replica,
--device-map JSON-or-file, --out, --no-resume, --prompt, --random-weights, --trust-remote-code,
--force ...  --gpus takes indices of this machine's GPUs ('0,1') or a virtual box ('2x24GiB').

Cell magic: %%vlm caption [FLAGS] takes image paths in the body, one per line (blank lines and
lines starting with # are skipped); with --prompt-from-body the body is the prompt instead.
%%vlm plan / %%vlm load take a device map (JSON) in the body.

Settings (applied when the flag is not given):
  %config VlmMagic.default_model = 'llava-1.5-7b'   %config VlmMagic.dtype = 'float16'
  %config VlmMagic.batch_size = 16                  %config VlmMagic.poll_interval = 0.5

Examples:
  %vlm gpus
  %vlm plan llava-1.5-7b --gpus 2x24GiB --strategy split --dtype bfloat16 --batch-size 16
  %vlm load --random-weights -o model
  %vlm caption photos/ --batch-size 8 --out run.jsonl -o result
"""


class _HelpShown(Exception):
    """argparse printed help and wanted to exit: stop quietly instead."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing to stderr and calling ``sys.exit``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("argument_default", argparse.SUPPRESS)  # only given flags reach the API
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (%vlm help {self.prog.split()[-1]} for usage)")

    def exit(self, status=0, message=None):
        if status:
            raise UsageError(message or f"{self.prog}: bad arguments")
        raise _HelpShown

    def print_help(self, file=None):
        print(self.format_help())


# ---- argument types ---------------------------------------------------------------------------

def gpus_arg(text: str):
    """'0,1' -> [0, 1] (this machine's GPUs by index); anything else is a spec string for vlmlab.gpus."""
    parts = [p.strip() for p in text.split(",")]
    if parts and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return text


def device_map_arg(text: str) -> dict:
    """A device map as JSON text, or a JSON file (a plain map, or a saved Plan: its first replica's map)."""
    text = text.strip()
    if not text.startswith("{"):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"{text!r} is neither JSON nor a file")
        with open(text) as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if isinstance(value, dict) and "replicas" in value:
        value = value["replicas"][0]["device_map"]
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError("a device map is a JSON object {module: device}, e.g. '{\"\": 0}'")
    return value


def int_list(text: str) -> list[int]:
    return [positive_int(p) for p in text.split(",") if p.strip()]


def str_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# ---- subcommand parsers -----------------------------------------------------------------------

def _model(p, help="model name, local folder or Hub id (default: the bundled captioner)"):
    p.add_argument("model", nargs="?", help=help)


def _hardware(p):
    p.add_argument("--gpus", type=gpus_arg, metavar="SPEC", help="GPU indices ('0,1') or a virtual box ('2x24GiB', 'a100-40gb')")


def _workload(p):
    p.add_argument("--dtype", metavar="DTYPE", help="bfloat16 | float16 | float32 | int8 | int4")
    p.add_argument("--batch-size", type=positive_int, metavar="N")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N")


def _placement(p):
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--gpus-per-replica", type=positive_int, metavar="N", help="GPUs per replica group (strategy hybrid)")
    p.add_argument("--device-map", type=device_map_arg, metavar="JSON", help="JSON text or file; a %%%%vlm cell body also works")
    p.add_argument("--trust-remote-code", action="store_true")


def _gpus_parser(p):
    p.add_argument("spec", nargs="?", help="a virtual box such as '2x24GiB'; none: this machine")
    p.add_argument("--min-free", metavar="SIZE", help="keep devices with at least this much free memory, e.g. 20GiB")
    p.add_argument("-n", type=positive_int, dest="n", metavar="N", help="keep the N devices with the most free memory")


def _plan_parser(p):
    _model(p)
    _hardware(p)
    _placement(p)
    _workload(p)
    p.add_argument("--prompt-tokens", type=positive_int, metavar="N")
    p.add_argument("--image-size", type=image_size, metavar="WxH", help="the images' size (default: a 1024x768 photo)")


def _load_parser(p):
    _model(p)
    p.add_argument("--plan", metavar="VAR", help="load by a Plan held in the variable VAR")
    _hardware(p)
    _placement(p)
    _workload(p)
    p.add_argument("--random-weights", action="store_true", help="build from the config with random weights")
    p.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors weights")
    p.add_argument("--force", action="store_true", help="load a second copy on devices that already hold one")
    p.add_argument("--replica", type=int, metavar="I", help="which replica of the plan to load (default 0)")


def _unload_parser(p):
    _model(p, help="model name (default: unload everything)")


def _loaded_parser(p):
    pass


def _caption_parser(p):
    p.add_argument("images", nargs="*", type=path_as_typed,
                   help="image files and/or folders (or one per line in a %%vlm body)")
    p.add_argument("--model")
    p.add_argument("--prompt")
    p.add_argument("--prompt-from-body", action="store_true", help="%%vlm: the cell body is the prompt")
    _hardware(p)
    _workload(p)
    p.add_argument("--out", metavar="PATH", help="journal file: results are appended as they come, a rerun resumes")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if --out exists")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--profile", action="store_true", help="also record memory and latency")


def _profile_parser(p):
    _model(p)
    p.add_argument("--images", nargs="+", type=path_as_typed, help="image files/folders (default: the API's)")
    p.add_argument("--prompt")
    _hardware(p)
    _placement(p)
    _workload(p)
    p.add_argument("--random-weights", action="store_true")


def _bench_parser(p):
    _model(p)
    p.add_argument("--strategies", type=str_list, help="comma-separated, e.g. single,split,replicate")
    p.add_argument("--batch-sizes", type=int_list, help="comma-separated, e.g. 1,8,16")
    _hardware(p)
    p.add_argument("--images", nargs="+", type=path_as_typed, help="image files/folders (default: the bundled samples)")
    p.add_argument("--n-images", type=positive_int, metavar="N", help="with --random-weights: synthetic images")
    p.add_argument("--prompt")
    p.add_argument("--dtype", metavar="DTYPE")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--image-size", type=image_size, metavar="WxH", help="the images' size the plan assumes")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _dashboard_parser(p):
    _model(p, help="model to start the plan editor with")
    _hardware(p)
    p.add_argument("--dtype", metavar="DTYPE")
    p.add_argument("--batch-size", type=positive_int, metavar="N")


def _help_parser(p):
    p.add_argument("topic", nargs="?", help="a subcommand")


SUBCOMMANDS = {  # name -> (adds arguments, one-line description)
    "gpus": (_gpus_parser, "this machine's GPUs, or a virtual box"),
    "plan": (_plan_parser, "place a model on GPUs and predict memory per device"),
    "load": (_load_parser, "load a model by a plan"),
    "unload": (_unload_parser, "unload a model (every model when none is named)"),
    "loaded": (_loaded_parser, "what is loaded where"),
    "caption": (_caption_parser, "caption images"),
    "profile": (_profile_parser, "measure memory and latency of a captioning run"),
    "bench": (_bench_parser, "compare strategies and batch sizes"),
    "dashboard": (_dashboard_parser, "the widget dashboard"),
    "help": (_help_parser, "usage of %vlm or of one subcommand"),
}
BODY = {"caption", "plan", "load"}  # subcommands that take a %%vlm cell body


def parser_for(sub: str) -> ArgumentParser:
    add, description = SUBCOMMANDS[sub]
    p = ArgumentParser(prog=f"%vlm {sub}", description=description)
    add(p)
    p.add_argument("-o", dest="var", metavar="VAR", help="store the result in the variable VAR")
    return p


def _user_errors():
    """Errors of the API that are the user's to fix (a bad value, a model that does not fit, a broken
    device map, a missing file, a second copy): shown as a short UsageError, not a traceback. Any
    other exception (a bug) keeps its traceback."""
    # PlanError, DeviceMapError, an unknown model are ValueErrors; ImportError: an optional package to install
    errors = [ValueError, FileNotFoundError, FileExistsError, ImportError]
    loading = sys.modules.get("vlmlab.run.loading")
    if loading is not None:
        errors.append(loading.AlreadyLoadedError)
    return tuple(errors)


@magics_class
class VlmMagic(Magics):
    """``%vlm`` / ``%%vlm``: see ``%vlm help``."""

    default_model = Unicode(None, allow_none=True, help="model used when none is named").tag(config=True)
    dtype = Unicode(None, allow_none=True, help="dtype used when --dtype is not given").tag(config=True)
    batch_size = Int(None, allow_none=True, help="batch size used when --batch-size is not given").tag(config=True)
    poll_interval = Float(1.0, help="seconds between samples of the dashboard's memory monitor").tag(config=True)

    @no_var_expand  # arguments are taken as typed: a prompt or path with {braces} or $ is not evaluated
    @line_cell_magic
    def vlm(self, line: str = "", cell: str | None = None):
        """%vlm SUBCOMMAND [ARGS]: a lab bench for vision-language models. %vlm help for usage."""
        try:
            argv = shlex.split(line, posix=os.name != "nt")
        except ValueError as err:
            raise UsageError(f"%vlm: cannot split the arguments: {err}") from None
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return None
        sub, rest = argv[0], argv[1:]
        if sub not in SUBCOMMANDS:
            close = difflib.get_close_matches(sub, SUBCOMMANDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"%vlm: unknown subcommand {sub!r}.{hint} Subcommands: {', '.join(SUBCOMMANDS)}"
                             " (%vlm help for usage)")
        if cell is not None and cell.strip() and sub not in BODY:
            raise UsageError(f"%%vlm {sub} takes no cell body (only {', '.join(sorted(BODY))} do)")
        parser = parser_for(sub)
        try:
            args = vars(parser.parse_args(rest))
        except _HelpShown:
            return None
        var = args.pop("var", None)
        if var is not None and (not var.isidentifier() or keyword.iskeyword(var)):
            raise UsageError(f"%vlm {sub} -o {var!r}: not a valid variable name")
        self._apply_settings(parser, args)
        try:
            result = getattr(self, "_" + sub)(args, cell)
        except UsageError:
            raise
        except _user_errors() as err:
            raise UsageError(f"%vlm {sub}: {err}") from err
        if var is not None:
            self.shell.user_ns[var] = result
        return result

    def _apply_settings(self, parser, args):
        dests = {a.dest for a in parser._actions}
        for trait, dest in (("default_model", "model"), ("dtype", "dtype"), ("batch_size", "batch_size")):
            value = getattr(self, trait)
            if dest == "model" and "plan" in args:  # %vlm load --plan VAR names its model already
                continue
            if dest in dests and dest not in args and value is not None:
                args[dest] = value

    def _help(self, args, cell):  # subcommands from here on: parse, call one API function, return
        topic = args.get("topic")
        if topic is None:
            print(USAGE)
        elif topic in SUBCOMMANDS:
            parser_for(topic).print_help()
        else:
            raise UsageError(f"%vlm help: no subcommand {topic!r}; subcommands: {', '.join(SUBCOMMANDS)}")

    def _gpus(self, args, cell):
        import vlmlab

        hw = vlmlab.gpus(args.get("spec"))
        if "min_free" in args or "n" in args:
            hw = hw.select(min_free=args.get("min_free"), n=args.get("n"))
        return hw

    def _plan(self, args, cell):
        import vlmlab

        _body_device_map(args, cell)
        return vlmlab.plan(**args)

    def _load(self, args, cell):
        import vlmlab

        _body_device_map(args, cell)
        if "plan" in args:
            name = args.pop("plan")
            if "model" in args:
                raise UsageError("%vlm load: give a MODEL or --plan VAR, not both")
            if name not in self.shell.user_ns:
                raise UsageError(f"%vlm load --plan: no variable {name!r}")
            args["model"] = self.shell.user_ns[name]
        return vlmlab.load(**args)

    def _unload(self, args, cell):
        import vlmlab

        return vlmlab.unload(args.get("model"))

    def _loaded(self, args, cell):
        import vlmlab

        return vlmlab.loaded()

    def _caption(self, args, cell):
        import vlmlab

        images = list(args.pop("images", []))
        from_body = args.pop("prompt_from_body", False)
        if from_body:
            if cell is None or not cell.strip():
                raise UsageError("%vlm caption --prompt-from-body: the prompt comes from a %%vlm cell body; it is empty")
            if "prompt" in args:
                raise UsageError("%vlm caption: give --prompt or --prompt-from-body, not both")
            args["prompt"] = cell.strip()
        elif cell is not None:
            images += [ln.strip() for ln in cell.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not images and from_body:
            raise UsageError("%vlm caption: with --prompt-from-body the cell body is the prompt; give the images "
                             "on the %%vlm line")
        if not images:
            raise UsageError("%vlm caption: which images? Give files or folders (or, in %%vlm caption, "
                             "one path per line in the cell body)")
        return vlmlab.caption(images[0] if len(images) == 1 else images, **args)

    def _profile(self, args, cell):
        import vlmlab

        if "images" in args and len(args["images"]) == 1:
            args["images"] = args["images"][0]
        return vlmlab.profile(**args)

    def _bench(self, args, cell):
        import vlmlab

        if "images" in args and len(args["images"]) == 1:
            args["images"] = args["images"][0]
        return vlmlab.bench(**args)

    def _dashboard(self, args, cell):
        import vlmlab

        return vlmlab.dashboard(poll_interval=self.poll_interval, **args)


def _body_device_map(args, cell):
    if cell is not None and cell.strip():
        if "device_map" in args:
            raise UsageError("give the device map as --device-map or in the cell body, not both")
        try:
            args["device_map"] = device_map_arg(cell)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"the %%vlm cell body should be a device map: {err}") from None


# ---- extension hooks --------------------------------------------------------------------------

def _registered(shell) -> VlmMagic | None:
    magic = shell.magics_manager.registry.get("VlmMagic")
    return magic if isinstance(magic, VlmMagic) else None


def load_ipython_extension(shell):
    """``%load_ext vlmlab``: register ``%vlm`` / ``%%vlm`` once (loading twice is a no-op)."""
    if _registered(shell) is not None:
        return
    magic = VlmMagic(shell=shell, config=shell.config)
    shell.register_magics(magic)
    if magic not in shell.configurables:
        shell.configurables.append(magic)


def unload_ipython_extension(shell):
    """``%unload_ext vlmlab``: close dashboards (stopping their monitor threads), unregister."""
    magic = _registered(shell)
    if magic is None:
        return
    if "vlmlab.ui.widgets" in sys.modules:  # dashboards exist only if it was imported
        sys.modules["vlmlab.ui.widgets"].close_all()
    manager = shell.magics_manager
    for kind in ("line", "cell"):
        manager.magics[kind].pop("vlm", None)
    manager.registry.pop("VlmMagic", None)
    while magic in shell.configurables:
        shell.configurables.remove(magic)
