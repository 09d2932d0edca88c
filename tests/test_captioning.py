"""vlmlab.caption(): real captions from the bundled model, broken inputs, resume, OOM, the gallery.

One copy of the bundled captioner is loaded for the module (``lm``) and reused by every test.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmlab
from vlmlab.run import batch as captioning
from vlmlab.run import prompts
from vlmlab.assets import scenes as synth
from vlmlab.assets import SAMPLES_DIR
from vlmlab.run.caption import JournalMismatchError
from vlmlab.run.journal import Journal
from vlmlab.run.loading import loaded, unload
from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL
from tests.badimages import make_broken_zoo, make_valid_zoo

pytestmark = pytest.mark.skipif(not (BUNDLED[DEFAULT_MODEL] / "config.json").exists(),
                                reason="the bundled captioner is not trained yet (scripts/train_captioner.py)")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """10 synthetic scenes (a different seed from the shipped samples): {path: reference caption}."""
    folder = tmp_path_factory.mktemp("scenes")
    refs = {}
    for i, (im, cap, _) in enumerate(synth.make_dataset(10, seed=4242)):
        path = folder / f"scene_{i:02d}.png"
        im.save(path)
        refs[str(path)] = cap
    return refs


@pytest.fixture(scope="module")
def baseline(lm, scenes):
    """Captions of the scenes from a plain, uninterrupted run."""
    return vlmlab.caption(list(scenes), model=lm, progress=False).captions


def _wrap_generate(monkeypatch, lm, before_call):
    """Replace lm.model.generate with one that calls ``before_call(n_call, inputs)`` first."""
    real = lm.model.generate
    calls = []

    def generate(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        before_call(len(calls), inputs)
        return real(**inputs)

    monkeypatch.setattr(lm.model, "generate", generate)
    return calls


# ------------------------------------------------------------------------------ real captions
def test_bundled_samples_match_reference_captions(lm):
    refs = json.loads((SAMPLES_DIR / "captions.json").read_text())
    paths = [SAMPLES_DIR / name for name in sorted(refs)]
    result = vlmlab.caption(paths, progress=False)  # model=None: the bundled captioner, reused
    assert len(loaded()) == 1 and loaded()[0] is lm, "model=None must reuse the loaded copy"
    assert [r["image"] for r in result.rows] == [str(p) for p in paths]
    got = {p.name: r["caption"] for p, r in zip(paths, result.rows)}
    same = [n for n in refs if got[n] == refs[n]]
    assert len(same) >= 0.75 * len(refs), f"only {len(same)}/{len(refs)} match: {got} vs {refs}"
    for r in result.rows:
        assert r["error"] is None and r["error_kind"] is None
        assert synth.parse_caption(r["caption"]) is not None, r["caption"]  # on the grammar
        assert r["n_tokens"] == len(r["caption"].split())  # word-level tokenizer: one token per word
        assert r["latency_ms"] > 0 and r["batch_size"] == len(paths) and r["device"] == "cpu"
    assert result.prompt == "caption" and result.prompt_text == "<s>USER: <image> caption ASSISTANT:"


def test_batching_does_not_change_captions(lm, scenes, baseline):
    one = vlmlab.caption(list(scenes), model=lm, batch_size=1, progress=False)
    assert one.captions == baseline
    assert {r["batch_size"] for r in one.rows} == {1}
    hits = sum(baseline[k] == v for k, v in scenes.items())
    assert hits >= 6, f"{hits}/10 scenes captioned right: {baseline}"


def test_pil_images_and_result_api(lm, scenes):
    ims = [Image.open(p) for p in list(scenes)[:3]]
    result = vlmlab.caption(ims, model=lm, batch_size=2, progress=False)
    assert len(result) == 3 and [r["image"] for r in result] == ["pil:0", "pil:1", "pil:2"]
    assert result[0] is result.rows[0]
    df = result.to_pandas()
    assert list(df.columns[:8]) == ["image", "caption", "error", "error_kind", "n_tokens", "latency_ms",
                                    "batch_size", "device"]
    assert len(df) == 3 and df["caption"].notna().all() and list(df["batch_size"]) == [2, 2, 1]
    assert json.loads(result.to_json()) == result.rows
    assert result.errors == {} and result.ok and set(result.captions) == {"pil:0", "pil:1", "pil:2"}
    assert "3 image(s): 3 captioned, 0 error(s)" in repr(result)


# ------------------------------------------------------------------------------ broken inputs
def test_broken_files_become_rows_and_good_images_are_captioned(lm, tmp_path):
    valid = make_valid_zoo(tmp_path)
    broken = make_broken_zoo(tmp_path)
    assert len(broken) >= 10 and len(set(broken.values())) >= 8
    # the folder scan + the two the scan cannot find: a path that does not exist, a folder named like an image
    inputs = [tmp_path, tmp_path / "missing.jpg", tmp_path / "folder.jpg"]
    # off-distribution images make the tiny model ramble to the token limit: 8 is enough here
    result = vlmlab.caption(inputs, model=lm, batch_size=8, max_new_tokens=8, progress=False)
    rows = {r["image"]: r for r in result}
    assert len(rows) == len(result) == len(valid) + len(broken)  # one row per input
    assert set(rows) == {str(tmp_path / n) for n in {**valid, **broken}}
    for name, kind in broken.items():
        row = rows[str(tmp_path / name)]
        assert row["error_kind"] == kind, (name, row)
        assert row["caption"] is None and row["error"].startswith(str(tmp_path / name))
    for name in valid:
        row = rows[str(tmp_path / name)]
        assert row["error"] is None, (name, row["error"])
        assert row["caption"] and row["n_tokens"] > 0, name
    assert set(result.errors) == {str(tmp_path / n) for n in broken}


def test_folder_input_and_gallery_html(lm, tmp_path):
    for name, (im, _, _) in zip(("a.png", "b.png", "c.png"), synth.make_dataset(3, seed=5)):
        im.resize((640, 480)).save(tmp_path / name)
    make_broken_zoo(tmp_path / "broken")
    result = vlmlab.caption(tmp_path, model=lm, progress=False)
    keys = [r["image"] for r in result]
    assert len(keys) == len(set(keys)) and str(tmp_path / "a.png") in keys
    html = result._repr_html_()
    thumbs = re.findall(r"src='data:image/jpeg;base64,([^']+)'", html)
    assert len(thumbs) == len(result.captions) == 3
    for b64 in thumbs:
        w, h = Image.open(io.BytesIO(base64.b64decode(b64))).size
        assert max(w, h) <= 96
    for r in result.rows:
        if r["caption"]:
            assert r["caption"] in html
    assert "truncated" in html and "not_an_image" in html  # broken inputs are tiles with their error
    assert html.count("vlmlab-captions") == 1
    assert len(html) < 30_000, len(html)


def test_model_failure_on_one_image_is_isolated(lm, scenes, monkeypatch):
    plain = Image.new("RGB", (64, 64), (200, 200, 200))

    def refuse_uniform(n, inputs):
        pv = inputs["pixel_values"]
        if any(float(p.max() - p.min()) == 0 for p in pv):
            raise ValueError("synthetic failure on a uniform image")

    _wrap_generate(monkeypatch, lm, refuse_uniform)
    ims = [Image.open(p) for p in list(scenes)[:3]]
    result = vlmlab.caption([ims[0], plain, ims[1], ims[2]], model=lm, batch_size=4, progress=False)
    kinds = [r["error_kind"] for r in result]
    assert kinds == [None, "failed", None, None]
    assert "synthetic failure" in result.rows[1]["error"]
    assert all(r["batch_size"] == 1 for r in result)  # the batch was retried one image at a time


def test_model_failing_on_everything_raises(lm, scenes, monkeypatch):
    def broken(n, inputs):
        raise ValueError("the model is broken")

    _wrap_generate(monkeypatch, lm, broken)
    with pytest.raises(ValueError, match="the model is broken"):
        vlmlab.caption(list(scenes)[:3], model=lm, progress=False)


# --------------------------------------------------------------------------- journal / resume
def test_interrupt_then_resume_is_exactly_once(lm, scenes, baseline, tmp_path, monkeypatch):
    out = tmp_path / "run" / "captions.jsonl"

    def interrupt_third(n, inputs):
        if n == 3:
            raise KeyboardInterrupt

    _wrap_generate(monkeypatch, lm, interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        vlmlab.caption(list(scenes), model=lm, batch_size=3, out=out, progress=False)
    rows = Journal(out).rows()
    assert [r["key"] for r in rows] == list(scenes)[:6]  # two complete batches, nothing of the third
    assert out.read_bytes().endswith(b"\n")

    monkeypatch.undo()
    calls = _wrap_generate(monkeypatch, lm, lambda n, inputs: None)
    result = vlmlab.caption(list(scenes), model=lm, batch_size=3, out=out, progress=False)
    assert calls == [3, 1]  # only the 4 images not done yet were captioned
    assert result.resumed == 6 and len(result) == 10
    assert [r["image"] for r in result] == list(scenes)
    keys = [r["key"] for r in Journal(out).rows()]
    assert sorted(keys) == sorted(scenes) and len(keys) == len(set(keys)) == 10
    assert result.captions == baseline  # the rows read back equal an uninterrupted run

    again = vlmlab.caption(list(scenes), model=lm, batch_size=3, out=out, progress=False)
    assert calls == [3, 1] and again.resumed == 10 and again.captions == baseline
    assert len(Journal(out).rows()) == 10


def test_resume_retries_inputs_that_had_an_error(lm, scenes, tmp_path):
    out = tmp_path / "c.jsonl"
    late = tmp_path / "late.png"
    first = vlmlab.caption([late, *list(scenes)[:2]], model=lm, out=out, progress=False)
    assert first.rows[0]["error_kind"] == "not_found"
    shutil.copy(list(scenes)[2], late)
    second = vlmlab.caption([late, *list(scenes)[:2]], model=lm, out=out, progress=False)
    assert second.resumed == 2 and second.errors == {} and second.rows[0]["caption"]
    assert Journal(out).done()[str(late)]["error"] is None


def test_resume_false_refuses_an_existing_journal(lm, scenes, tmp_path):
    out = tmp_path / "c.jsonl"
    vlmlab.caption(list(scenes)[:2], model=lm, out=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"delete it.*resume=True"):
        vlmlab.caption(list(scenes)[:2], model=lm, out=out, resume=False, progress=False)
    assert out.read_bytes() == before
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert len(vlmlab.caption(list(scenes)[:1], model=lm, out=empty, resume=False, progress=False)) == 1


def test_resume_refuses_a_journal_of_another_prompt(lm, scenes, tmp_path):
    out = tmp_path / "c.jsonl"
    vlmlab.caption(list(scenes)[:2], model=lm, out=out, progress=False)
    with pytest.raises(JournalMismatchError, match="prompt"):
        vlmlab.caption(list(scenes)[:2], model=lm, out=out, prompt="describe", progress=False)


# -------------------------------------------------------------------------------------- OOM
@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_oom_halves_the_batch_and_records_it(lm, scenes, baseline, monkeypatch, error):
    def oom_above_two(n, inputs):
        if inputs["input_ids"].shape[0] > 2:
            raise error

    calls = _wrap_generate(monkeypatch, lm, oom_above_two)
    result = vlmlab.caption(list(scenes), model=lm, batch_size=8, progress=False)
    assert result.errors == {} and result.captions == baseline
    assert result.oom_retries == 2  # 8 -> 4 -> 2, then the smaller size is kept for the next batch
    assert calls == [8, 4, 2, 2, 2, 2, 2]
    assert [r["batch_size"] for r in result] == [2] * 10
    assert "2 OOM retries" in result.summary()


def test_oom_at_batch_one_becomes_an_oom_row(lm, scenes, monkeypatch):
    def oom_on_second_image(n, inputs):
        if inputs["input_ids"].shape[0] > 1 or n == 3:  # calls: [3] OOM, then [1] per image: 2nd image OOM
            raise torch.OutOfMemoryError("CUDA out of memory")

    _wrap_generate(monkeypatch, lm, oom_on_second_image)
    result = vlmlab.caption(list(scenes)[:3], model=lm, batch_size=3, progress=False)
    assert [r["error_kind"] for r in result] == [None, "oom", None]
    assert "out of memory even with one image per batch" in result.rows[1]["error"]


# ------------------------------------------------------------------------------- model forms
def test_model_as_loaded_model_plan_and_name_reuse_the_loaded_copy(lm, scenes, baseline):
    paths = list(scenes)[:1]
    want = {k: baseline[k] for k in paths}
    for model in (lm, lm.plan, DEFAULT_MODEL, "tiny-captioner", str(BUNDLED[DEFAULT_MODEL]), None):
        assert vlmlab.caption(paths, model=model, progress=False).captions == want, model
    assert vlmlab.caption(paths, gpus="cpu", progress=False).captions == want  # on the CPU: that copy
    assert len(loaded()) == 1 and loaded()[0] is lm


def test_model_as_folder_plans_and_loads_then_reuses(lm, scenes, baseline, tmp_path):
    folder = tmp_path / "copy-of-captioner"
    shutil.copytree(BUNDLED[DEFAULT_MODEL], folder)
    paths = list(scenes)[:2]
    try:
        result = vlmlab.caption(paths, model=str(folder), progress=False)
        assert result.model == str(folder) and len(loaded()) == 2
        assert result.captions == {k: baseline[k] for k in paths}
        vlmlab.caption(paths, model=str(folder), progress=False)
        assert len(loaded()) == 2  # the second call reused the copy the first one loaded
    finally:
        unload(str(folder))
    assert len(loaded()) == 1 and loaded()[0] is lm


def test_model_as_a_fresh_plan_loads_it(lm, scenes, baseline, tmp_path):
    folder = tmp_path / "another-copy"
    shutil.copytree(BUNDLED[DEFAULT_MODEL], folder)
    plan = vlmlab.plan(str(folder), gpus="cpu", strategy="single", dtype="float32")
    try:
        result = vlmlab.caption(list(scenes)[:2], model=plan, progress=False)
        assert loaded()[-1].plan is plan and result.captions == {k: baseline[k] for k in list(scenes)[:2]}
    finally:
        unload(str(folder))


def test_random_weights_model_cannot_caption(lm, scenes):
    rw = vlmlab.LoadedModel("x", lm.model, None, lm.plan, lm.dtype, ["cpu"], random_weights=True)
    with pytest.raises(ValueError, match="no processor"):
        captioning.caption_batch(rw, [Image.new("RGB", (8, 8))], "caption", 4)


def test_bad_arguments(lm, scenes):
    with pytest.raises(ValueError, match="batch_size"):
        vlmlab.caption(list(scenes), model=lm, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlmlab.caption(list(scenes), model=lm, max_new_tokens=-1)
    with pytest.raises(TypeError, match="collect"):
        vlmlab.caption(42, model=lm)
    with pytest.raises(ValueError, match="float32"):
        vlmlab.caption(list(scenes), model=lm, dtype="bfloat16")


def test_max_new_tokens_and_prompt_are_passed(lm, scenes, monkeypatch):
    seen = []
    real = lm.model.generate

    def generate(**kw):
        seen.append(kw)
        return real(**kw)

    monkeypatch.setattr(lm.model, "generate", generate)
    result = vlmlab.caption(list(scenes)[:2], model=lm, max_new_tokens=2, progress=False)
    assert seen[0]["max_new_tokens"] == 2 and seen[0]["do_sample"] is False
    assert all(r["n_tokens"] <= 2 for r in result)
    vlmlab.caption(list(scenes)[:1], model=lm, progress=False)
    assert seen[1]["max_new_tokens"] == prompts.TINY_MAX_NEW_TOKENS
    assert (seen[1]["attention_mask"][0] == 1).all()  # one prompt length: no padding


# ---------------------------------------------------------------------------------- profile
def test_profile_attaches_a_profile(lm, scenes):
    pytest.importorskip("vlmlab.observe.profiler")
    result = vlmlab.caption(list(scenes)[:4], model=lm, batch_size=2, profile=True, progress=False)
    prof = result.profile
    assert prof is not None and prof.images == 4 and prof.tokens == sum(r["n_tokens"] for r in result)
    assert prof.generate_calls == 2 and prof.latency["decode"]["calls"] > 0


def test_unloaded_model_is_refused(scenes):
    model = vlmlab.LoadedModel("gone", None, None, None, "float32", ["cpu"])
    with pytest.raises(ValueError, match="unloaded"):
        vlmlab.caption(list(scenes)[:1], model=model)


@pytest.mark.slow
def test_plan_with_replicas_runs_on_worker_processes(lm, scenes, baseline, tmp_path):
    plan = vlmlab.plan(None, gpus="2xcpu", strategy="replicate", dtype="float32")
    assert len(plan.replicas) == 2
    out = tmp_path / "rep.jsonl"
    result = vlmlab.caption(list(scenes), model=plan, batch_size=2, out=out, progress=False)
    assert [r["image"] for r in result] == list(scenes)
    assert result.captions == baseline  # same weights, same greedy captions, in another process
    keys = [r["key"] for r in Journal(out).rows()]
    assert sorted(keys) == sorted(scenes) and len(keys) == len(set(keys))
    assert len(loaded()) == 1 and loaded()[0] is lm  # the workers' copies live and die in the workers


def test_caption_items_is_the_worker_seam(lm, scenes, baseline, monkeypatch, tmp_path):
    from vlmlab.run.images import collect

    lm.__dict__.pop("_caption_state", None)

    def oom_above_two(n, inputs):
        if inputs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    calls = _wrap_generate(monkeypatch, lm, oom_above_two)
    try:
        items = collect(list(scenes)[:4])
        rows = captioning.caption_items(lm, items, "caption", 24, batch_size=4)
        assert calls == [4, 2, 2] and [r["batch_size"] for r in rows] == [2] * 4
        assert {r["image"]: r["caption"] for r in rows} == {k: baseline[k] for k in list(scenes)[:4]}
        more = collect([*list(scenes)[4:8], tmp_path / "gone.png"])
        rows = captioning.caption_items(lm, more, "caption", 24, batch_size=4)
        assert calls == [4, 2, 2, 2, 2]  # what fits is remembered on the model: no second OOM
        assert [r["error_kind"] for r in rows] == [None] * 4 + ["not_found"]
    finally:
        lm.__dict__.pop("_caption_state", None)


def test_batch_functions_default_the_prompt_like_caption(lm, scenes, baseline):
    from vlmlab.run.images import collect

    rows = captioning.caption_items(lm, collect(list(scenes)[:2]))  # prompt/max_new_tokens None, as bench passes
    assert {r["image"]: r["caption"] for r in rows} == {k: baseline[k] for k in list(scenes)[:2]}
    out = captioning.caption_batch(lm, [Image.open(list(scenes)[0]).convert("RGB")], None, None)
    assert [(o["caption"], o["n_tokens"], len(o["tokens"])) for o in out] == [(baseline[list(scenes)[0]], 6, 6)]


def test_the_next_batch_is_processed_while_this_one_generates(lm, scenes, baseline, monkeypatch):
    import threading

    threads = []
    real = captioning.caption_inputs

    def spy(processor, images, prompt):
        threads.append((threading.current_thread().name, len(images)))
        return real(processor, images, prompt)

    monkeypatch.setattr(captioning, "caption_inputs", spy)
    result = vlmlab.caption(list(scenes), model=lm, batch_size=4, progress=False)
    assert result.captions == baseline
    # the model was loaded already: every batch was processed in the thread that opens images ahead,
    # and none again on the main thread
    assert threads == [("vlmlab-open_0", 4), ("vlmlab-open_0", 4), ("vlmlab-open_0", 2)]
    threads.clear()
    paths = list(scenes)[:5]
    rows = captioning.caption_items(lm, [captioning.ImageItem(p, Path(p)) for p in paths], batch_size=2)
    assert [r["caption"] for r in rows] == [baseline[p] for p in paths]
    assert sorted(name.startswith("vlmlab-prepare") for name, _ in threads) == [False, True, True]  # a worker's job too
