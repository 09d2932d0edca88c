"""Images/s of the Ray backend against local worker processes, on the same CPU replicas.

Both runs caption the same generated scenes with the bundled captioner, one replica per CPU core
and one torch thread per replica, through ``vlmlab.bench(strategies=["replicate"])``: local
worker processes on ``"<N>xcpu"``, then Ray actors on ``gpus("ray")`` of a one-node Ray instance
started here with the same N CPUs. Rounds alternate local / Ray so that drift of a shared host
hits both. Reported: steady images/s (each worker's images over its own busy time, summed: no
start-up, no idle tail) and images/s from the go signal to the last batch; overhead = how much
slower Ray is at steady state (target: within 10 %), from the median of the per-round ratios
(each round's two runs are back to back, so a busy spell of the host hits both alike).

    python benchmarks/ray_vs_local.py [--cpus 2] [--images 1024] [--batch-size 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2, help="CPU replicas (and Ray CPUs)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import ray

    import vlmlab
    from vlmlab.assets.scenes import make_dataset

    folder = tempfile.mkdtemp(prefix="vlmlab-ray-bench-")
    for i, (image, _, _) in enumerate(make_dataset(args.images, seed=7, size=64)):
        image.save(os.path.join(folder, f"scene_{i:04d}.png"))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    cluster = vlmlab.gpus("ray")
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, python "
          f"{platform.python_version()}, ray {ray.__version__}; {args.cpus} CPU replicas x 1 thread, "
          f"{args.images} images, batch {args.batch_size}, bundled captioner (float32)")
    print(f"{'round':>5} {'backend':<8} {'steady img/s':>12} {'go->end img/s':>13} {'load s':>7} {'batches/worker':>15}")
    steady = {"local": [], "ray": []}
    for r in range(args.rounds):
        for backend, gpus in (("local", f"{args.cpus}xcpu"), ("ray", cluster)):
            row = vlmlab.bench(strategies=["replicate"], batch_sizes=[args.batch_size], gpus=gpus, images=folder,
                               dtype="float32", progress=False).rows[0]
            assert row["images"] == args.images and row["errors"] == 0 and row["died"] == 0, row
            steady[backend].append(row["steady_images_per_s"])
            print(f"{r:>5} {backend:<8} {row['steady_images_per_s']:>12.2f} {row['images_per_s']:>13.2f} "
                  f"{row['load_s']:>7.1f} {row['batches_per_worker']:>15}", flush=True)
    local, remote = statistics.median(steady["local"]), statistics.median(steady["ray"])
    ratio = statistics.median(r / l for r, l in zip(steady["ray"], steady["local"]))
    overhead = 100 * (1 - ratio)
    print(f"# median steady images/s: local {local:.2f}, ray {remote:.2f}; median per-round ray/local "
          f"{ratio:.3f}: Ray overhead {overhead:+.1f} % ({'within' if overhead <= 10 else 'OVER'} the 10 % target)")
    ray.shutdown()


if __name__ == "__main__":
    main()
