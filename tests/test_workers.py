"""replicate / hybrid for real: spawned CPU worker processes, a shared queue, dead workers."""
from __future__ import annotations

import multiprocessing as mp

import pytest

import vlmlab
from vlmlab.run import workers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A small random-weight LLaVA saved as a config folder (loads with random_weights=True)."""
    from transformers import LlavaConfig

    vc = dict(model_type="clip_vision_model", hidden_size=32, image_size=28, intermediate_size=64,
              num_attention_heads=2, num_hidden_layers=2, patch_size=14)
    tc = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_hidden_layers=4, num_key_value_heads=1, vocab_size=300)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=299, vision_feature_layer=-2)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    folder = tmp_path_factory.mktemp("tiny-llava")
    cfg.save_pretrained(folder)
    return str(folder)


def _plan(model, spec="2xcpu", **kw):
    return vlmlab.plan(model, gpus=spec, dtype="float32", **kw)


def test_replicate_uses_one_process_per_replica_and_shares_the_queue(tiny_llava):
    p = _plan(tiny_llava, strategy="replicate")
    assert p.strategy == "replicate" and len(p.replicas) == 2
    payloads = [[f"b{i}-{j}" for j in range(2)] for i in range(12)]
    seen = []
    rows, stats = workers.run_replicas(p, payloads, "tests.worker_jobs:echo", {"delay": 0.05},
                                       load_kwargs={"random_weights": True}, on_rows=seen.extend)
    assert sorted(r["image"] for r in rows) == sorted(x for b in payloads for x in b)
    assert len(seen) == len(rows)  # streamed back as batches finished
    assert {r["replica"] for r in rows} == {0, 1}  # both replicas took work from the one queue
    assert len({r["pid"] for r in rows}) == 2
    assert sum(stats.batches.values()) == 12 and not stats.died
    assert not mp.active_children()


def test_killed_worker_batch_is_requeued_to_the_survivor(tiny_llava):
    p = _plan(tiny_llava, strategy="replicate")
    payloads = [[f"b{i}"] for i in range(6)]
    rows, stats = workers.run_replicas(p, payloads, "tests.worker_jobs:die_on_replica_1", {"delay": 0.05},
                                       load_kwargs={"random_weights": True})
    assert sorted(r["image"] for r in rows) == sorted(f"b{i}" for i in range(6))  # every batch exactly once
    assert {r["replica"] for r in rows} == {0}
    assert 1 in stats.died and stats.requeued == 1
    assert any("replica 1 died" in w for w in stats.warnings)


def test_all_workers_dead_is_an_error_that_keeps_finished_rows(tiny_llava):
    p = _plan(tiny_llava, strategy="replicate")
    with pytest.raises(workers.WorkerError, match="every worker died") as err:
        workers.run_replicas(p, [["a"], ["b"]], "tests.worker_jobs:always_die", {},
                             load_kwargs={"random_weights": True})
    assert err.value.rows == []
    assert not mp.active_children()


def test_keyboard_interrupt_stops_workers_and_keeps_what_is_done(tiny_llava):
    p = _plan(tiny_llava, strategy="replicate")
    kept = []

    def on_rows(rows):
        kept.extend(rows)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workers.run_replicas(p, [[f"b{i}"] for i in range(20)], "tests.worker_jobs:echo", {"delay": 0.05},
                             load_kwargs={"random_weights": True}, on_rows=on_rows)
    assert len(kept) == 1
    assert not mp.active_children()


def test_hybrid_runs_split_replicas_in_workers(tiny_llava):
    p = _plan(tiny_llava, spec="4xcpu", strategy="hybrid", gpus_per_replica=2)
    assert p.strategy == "hybrid" and [len(r.gpus) for r in p.replicas] == [2, 2]
    rows, stats = workers.run_replicas(p, [1] * 8, "vlmlab.run.dry_run:synthetic_batch",
                                       {"batch_size": 1, "max_new_tokens": 3}, load_kwargs={"random_weights": True})
    assert len(rows) == 8 and all(r["n_tokens"] == 3 for r in rows)
    assert not stats.died


def test_bench_compares_strategies_on_cpu_workers(tiny_llava):
    r = vlmlab.bench(tiny_llava, strategies=["single", "replicate"], batch_sizes=[2], gpus="2xcpu",
                     random_weights=True, n_images=8, max_new_tokens=3, progress=False)
    df = r.to_pandas()
    assert list(df["strategy"]) == ["single", "replicate"]
    assert list(df["replicas"]) == [1, 2]
    assert (df["images"] == 8).all() and (df["images_per_s"] > 0).all() and (df["errors"] == 0).all()
    assert "<table" in r._repr_html_()


def test_caption_with_a_replicate_plan_matches_in_process_captions():
    from vlmlab.assets import SAMPLES_DIR
    from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL

    if not (BUNDLED[DEFAULT_MODEL] / "config.json").exists():
        pytest.skip("the bundled captioner is not there")
    samples = sorted((SAMPLES_DIR).glob("*.png"))[:6]
    local = vlmlab.caption(samples, batch_size=2, progress=False, gpus="cpu")
    p = vlmlab.plan(None, gpus="2xcpu", strategy="replicate", dtype="float32", batch_size=2)
    remote = vlmlab.caption(samples, model=p, batch_size=2, progress=False)
    assert len(remote) == len(samples)
    assert remote.captions == local.captions
    assert set(remote.to_pandas()["error"].isna()) == {True}


def test_bench_isolate_runs_single_in_a_worker_process(tiny_llava, monkeypatch):
    from vlmlab.run import loading

    def no_load_here(*args, **kwargs):
        raise AssertionError("isolate=True must not load the model in this process")

    monkeypatch.setattr(loading, "load", no_load_here)  # the spawned worker imports its own, unpatched
    r = vlmlab.bench(tiny_llava, strategies=["single"], batch_sizes=[2], gpus="2xcpu", random_weights=True,
                     n_images=4, max_new_tokens=2, progress=False, isolate=True)
    row = r.rows[0]
    assert row["strategy"] == "single" and row["replicas"] == 1 and row["images"] == 4 and row["died"] == 0
    assert not mp.active_children()
    with pytest.raises(AssertionError, match="must not load"):  # and without isolate it does load here
        vlmlab.bench(tiny_llava, strategies=["single"], batch_sizes=[2], gpus="2xcpu", random_weights=True,
                     n_images=2, max_new_tokens=2, progress=False, isolate=False)
