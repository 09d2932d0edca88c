"""One :class:`~vlmlab.Profile` for a run over several replica worker processes.

Each worker profiles its own replica (``run_replicas(..., profile=True)``) and sends back its
Profile with the moment it started, read on ``time.perf_counter`` — the host's monotonic clock,
shared by all processes of one host — so the parent can put every worker's memory samples and
steps on one time axis, starting when the workers were told to go.

GPUs belong to one replica each. CPU workers all call their device ``"cpu"``; in the merged
profile each becomes ``"cpu/r<worker>"`` so that their memory curves stay apart.
"""
from __future__ import annotations

from dataclasses import replace


def merge(parts: dict, t0: float, wall_s: float):
    """``parts``: worker -> (Profile, its start on perf_counter). ``t0``: the go signal on the same
    clock; ``wall_s``: from the go signal to the last batch done. Returns the merged Profile, whose
    ``replicas`` holds the workers' own profiles (renamed devices, shifted clocks)."""
    from vlmlab.observe.profile import Profile
    from vlmlab.observe.sampler import ordered_devices

    if not parts:
        raise ValueError("no worker sent a profile")
    seen: dict = {}
    for w, (p, _) in parts.items():
        for d in p.devices:
            seen.setdefault(d, set()).add(w)
    shared = {d for d, ws in seen.items() if len(ws) > 1}
    shifted = {w: _shift(p, start - t0, w, shared) for w, (p, start) in sorted(parts.items())}
    profiles = list(shifted.values())

    stages: dict = {}
    device_ms: dict = {}
    steps, samples, notes = [], [], []
    for w, p in shifted.items():
        for stage, calls in p.stages.items():
            stages.setdefault(stage, []).extend(calls)
        for d, by_stage in p.device_ms.items():
            device_ms[d] = by_stage
        steps += [{**s, "replica": w} for s in p.steps]
        samples += [{**s, "replica": w} for s in p.samples]
        notes += [n for n in p.notes if n not in notes]
    first = profiles[0]
    same_layers = all(len(p.layer_ms) == len(first.layer_ms) for p in profiles)
    layer_ms = [sum(col) for col in zip(*(p.layer_ms for p in profiles))] if same_layers else []
    if len(profiles) > 1 and layer_ms:
        notes.append(f"per-layer times are summed over {len(profiles)} replicas, shown on replica 0's devices; "
                     "profile.replicas holds each")
    notes.append(f"{len(profiles)} replica workers, each profiled in its own process; time 0 is when they were "
                 "told to go")
    counted = [p.images for p in profiles]
    return Profile(model=first.model, devices=ordered_devices({d for p in profiles for d in p.devices}), wall_s=wall_s,
                   images=None if None in counted else sum(counted),
                   tokens=None if any(p.tokens is None for p in profiles) else sum(p.tokens for p in profiles),
                   stages=stages, device_ms=device_ms, layer_ms=layer_ms,
                   layer_devices=list(first.layer_devices) if layer_ms else [],
                   steps=sorted(steps, key=lambda s: s["start"]), samples=sorted(samples, key=lambda s: s["t"]),
                   peaks={d: v for p in profiles for d, v in p.peaks.items()},
                   predicted={d: v for p in profiles for d, v in p.predicted.items()},
                   interval=first.interval, detail=first.detail, notes=notes, replicas=profiles)


def _shift(p, offset: float, worker: int, shared: set):
    """``p`` with its times moved by ``offset`` seconds and its shared devices renamed."""
    def name(d):
        return f"{d}/r{worker}" if d in shared else d

    def keyed(mapping):
        return {name(d): v for d, v in mapping.items()}

    return replace(p, devices=[name(d) for d in p.devices], device_ms=keyed(p.device_ms),
                   layer_devices=[name(d) for d in p.layer_devices],
                   steps=[{**s, "start": s["start"] + offset, "end": s["end"] + offset} for s in p.steps],
                   samples=[{**s, "t": s["t"] + offset, "device": name(s["device"])} for s in p.samples],
                   peaks=keyed(p.peaks), predicted=keyed(p.predicted))
