"""Jobs for tests/test_workers.py. They live in a module (not the test file) because spawned
worker processes import them by name: "tests.worker_jobs:FUNCTION"."""
from __future__ import annotations

import os
import signal
import time


def echo(lm, payload, delay=0.02):
    """One row per item, saying which replica did it."""
    time.sleep(delay)
    return [{"image": str(x), "replica": lm.replica, "pid": os.getpid(), "error": None, "latency_ms": delay * 1000}
            for x in payload]


def die_on_replica_1(lm, payload, delay=0.02):
    """Replica 1 is killed (SIGKILL, as the OOM killer or a CUDA fault would) while holding a batch."""
    if lm.replica == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return echo(lm, payload, delay)


def always_die(lm, payload):
    os.kill(os.getpid(), signal.SIGKILL)


def report_cores(lm, payload, delay=0.05):
    """Which cores and how many torch threads this worker was given."""
    import torch

    time.sleep(delay)
    return [{"image": str(payload), "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)),
             "threads": torch.get_num_threads(), "error": None, "latency_ms": delay * 1000}]
