"""vlmlab.Plan: JSON round trip, HTML, picture, editing with move(), pandas."""
import json

import pytest

import vlmlab
from vlmlab.plan.devicemap import DeviceMapError
from vlmlab.hardware import fmt_bytes
from vlmlab.plan.plan import Plan

LLM = "model.language_model"
GiB = 1024**3


@pytest.fixture(scope="module")
def split():
    return vlmlab.plan("llava-1.5-7b", "2x24GiB", strategy="split", batch_size=4)


@pytest.fixture(scope="module")
def replicas():
    return vlmlab.plan("llava-1.5-7b", "2x80GiB", strategy="replicate")


def boundary(plan):
    """Index of the first decoder layer on GPU1."""
    return [plan.device_map[f"{LLM}.layers.{i}"] for i in range(32)].index(1)


# ---- JSON -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["split", "replicas"])
def test_json_round_trip(which, request):
    p = request.getfixturevalue(which)
    text = p.to_json()
    d = json.loads(text)
    assert d["model"] == "llava-1.5-7b" and d["strategy"] == p.strategy and d["workload"]["batch_size"] == p.batch_size
    q = Plan.from_json(text)
    assert q.strategy == p.strategy and q.requested == p.requested and q.dtype == p.dtype
    assert q.workload == p.workload
    assert [r.gpus for r in q.replicas] == [r.gpus for r in p.replicas]
    assert [r.device_map for r in q.replicas] == [r.device_map for r in p.replicas]
    assert all(isinstance(d, int) for r in q.replicas for d in r.device_map.values())  # not "0" strings
    assert q.memory == p.memory and list(q.memory) == list(p.memory)  # int keys again, same bytes
    assert q.hardware.devices == p.hardware.devices
    assert q.warnings == p.warnings and q.problems == p.problems
    assert q == p


def test_json_file_round_trip(split, tmp_path):
    path = tmp_path / "plan.json"
    text = split.to_json(path)
    assert path.read_text() == text
    q = Plan.from_json(path)  # a path, not the text
    assert q.device_map == split.device_map and q.predicted() == split.predicted()
    assert Plan.from_json(str(path)) == q


def test_loaded_plan_can_still_be_edited(split):
    q = Plan.from_json(split.to_json())
    assert q.spec is None  # it resolves the model again when needed
    moved = q.move(layers=[boundary(split)], to=0)
    assert moved.ok and moved.device_map[f"{LLM}.layers.{boundary(split)}"] == 0


# ---- display -------------------------------------------------------------------------------------

def test_repr_html(split):
    html = split._repr_html_()
    assert "llava-1.5-7b" in html and "strategy <b>split</b>" in html and "batch 4" in html
    # the module -> device table, with runs of layers grouped
    assert "<th>module</th><th>device</th>" in html
    b = boundary(split)
    assert f"<code>layers 0–{b - 1}</code></td><td>GPU0</td>" in html
    assert f"<code>layers {b}–31</code></td><td>GPU1</td>" in html
    assert "<code>model.vision_tower</code></td><td>GPU0</td>" in html
    assert "<code>lm_head</code></td><td>GPU1</td>" in html
    # memory per GPU: predicted peak and what is available
    assert "<th>predicted peak</th>" in html
    for i, total in split.predicted().items():
        assert f"<td>GPU{i} (" in html and fmt_bytes(total) in html
    assert html.count("24.0 GiB") >= 2
    assert "<img src='data:image/png;base64," in html
    assert "not faster" in html  # the warnings


def test_repr_html_shows_problems_in_red(split):
    bad = split.move("model.language_model.layers.3.mlp", to=1 - split.device_map["model.language_model.layers.3"])
    html = bad._repr_html_()
    assert "<li style='color:#c44e52'>&#x27;model.language_model.layers.3&#x27; (LlamaDecoderLayer) is split" in html


def test_summary_groups_layer_runs(split):
    rows = split.summary()
    b = boundary(split)
    assert (f"layers 0–{b - 1}", "GPU0") in rows and (f"layers {b}–31", "GPU1") in rows
    assert len(rows) == 8  # vision, projector, embeddings, rotary, two layer runs, norm, head
    rep = vlmlab.plan("llava-1.5-7b", "2x80GiB", strategy="replicate").summary()
    assert ("replica 1: layers 0–31", "GPU1") in rep


def test_repr(split):
    r = repr(split)
    assert r.startswith("Plan(llava-1.5-7b, split, bfloat16, batch 4, 1 replica(s), predicted GPU0:")
    assert "PROBLEMS" not in r and "PROBLEMS" in repr(split.move("model.language_model.layers.3.mlp", to=1 - split.device_map["model.language_model.layers.3"]))


def test_plot_one_bar_per_gpu_and_a_capacity_line(split):
    from matplotlib.figure import Figure

    fig = split.plot()
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["GPU0", "GPU1"]
    assert ax.containers and all(len(c) == 2 for c in ax.containers)  # each stacked layer: one bar per GPU
    # the stacked bars of a GPU reach its capacity (used + free)
    for x, i in enumerate(sorted(split.memory)):
        tops = [c[x].get_y() + c[x].get_height() for c in ax.containers]
        assert max(tops) == pytest.approx(24.0)
        used = sum(c[x].get_height() for c in ax.containers[:-1])  # all but the "free" layer
        assert used == pytest.approx(split.predicted()[i] / GiB)
    caps = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert len(caps) == 2 and all(seg[0][1] == seg[1][1] == pytest.approx(24.0) for seg in caps)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"vision", "KV cache", "context", "free"} <= set(labels)


def test_plot_into_given_axes(split):
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert split.plot(ax=ax) is fig


def test_save_picture(split, tmp_path):
    path = tmp_path / "plan.png"
    assert split.save_picture(path) == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ---- editing ---------------------------------------------------------------------------------------

def test_move_layers(split):
    b = boundary(split)
    before = dict(split.device_map)
    moved = split.move(layers=range(b - 3, b), to=1)
    assert split.device_map == before  # the original plan is untouched
    assert moved is not split and moved.strategy == "custom" and moved.ok
    for i in range(32):
        assert moved.device_map[f"{LLM}.layers.{i}"] == (0 if i < b - 3 else 1)
    assert moved.replicas[0].gpus == [0, 1]
    # three layers' weights and KV cache go from GPU0 to GPU1
    old, new = split.predicted(), moved.predicted()
    assert new[0] < old[0] and new[1] > old[1]
    assert old[0] - new[0] == pytest.approx(new[1] - old[1], rel=0.02)
    assert moved.memory[1]["kv_cache"] == pytest.approx(split.memory[1]["kv_cache"] * (32 - b + 3) / (32 - b))


def test_move_everything_to_one_gpu(split):
    p = split.move(layers=range(32), to=0).move([f"{LLM}.norm", "lm_head"], to=0)
    assert set(p.device_map.values()) == {0} and p.replicas[0].gpus == [0]
    assert list(p.memory) == [0] and p.ok


def test_moving_the_vision_tower_alone_costs_a_copy(split):
    # transformers' LLaVA moves the image features to the embeddings' device itself: a warning, not an error
    moved = split.move("model.vision_tower", to=1)
    assert moved.ok and any("vision on GPU1" in w and "moves the image features" in w for w in moved.warnings)


def test_a_problem_fails_validation(split):
    bad = split.move("lm_head", to=7)
    assert not bad.ok
    with pytest.raises(DeviceMapError) as err:
        bad.validate()
    assert err.value.problems == bad.problems
    assert split.validate() is split


def test_move_part_of_a_layer_breaks_no_split(split):
    bad = split.move(f"{LLM}.layers.0.mlp", to=1)
    assert bad.device_map[f"{LLM}.layers.0.mlp"] == 1 and bad.device_map[f"{LLM}.layers.0.self_attn"] == 0
    assert any("(LlamaDecoderLayer) is split across GPU0 and GPU1" in p for p in bad.problems)


def test_move_to_a_missing_gpu_or_over_capacity(split):
    assert any("mapped to GPU 7, which does not exist" in p for p in split.move("lm_head", to=7).problems)
    small = vlmlab.plan("llava-1.5-7b", "2x10GiB", strategy="split")
    over = small.move(layers=range(32), to=0)
    assert any(p.startswith("GPU0 is over capacity") for p in over.problems)


def test_move_in_one_replica(replicas):
    edited = replicas.move("lm_head", to=0, replica=1)
    assert edited.strategy == "replicate"  # still two replicas
    assert edited.replicas[0].device_map == replicas.replicas[0].device_map
    assert edited.replicas[1].device_map["lm_head"] == 0 and edited.replicas[1].gpus == [0, 1]
    # GPU0 now holds all of replica 0 plus replica 1's head, logits and a second worker's CUDA context
    old, new = replicas.predicted(), edited.predicted()
    assert new[0] > old[0] + 2 * 32064 * 4096  # the head's bf16 weights, on top of a full replica
    assert new[1] < old[1]
    assert edited.memory[0]["layers"] == replicas.memory[0]["layers"]  # replica 0's layers still counted
    assert edited.ok


def test_replicas_sharing_a_gpu_over_capacity():
    p = vlmlab.plan("llava-1.5-7b", "2x16GiB", strategy="replicate")
    assert p.ok and [r.gpus for r in p.replicas] == [[0], [1]]
    edited = p.move(layers=range(10), to=0, replica=1)  # onto a GPU already holding a full replica
    assert edited.memory[0]["layers"] > p.memory[0]["layers"]
    assert edited.predicted()[0] > 16 * GiB
    assert any(q.startswith("GPU0 is over capacity: replicas [0, 1] share it") for q in edited.problems)
    with pytest.raises(DeviceMapError):
        edited.validate()


def test_move_needs_something_to_move(split):
    with pytest.raises(ValueError, match="say what to move"):
        split.move(to=1)


# ---- pandas ----------------------------------------------------------------------------------------

def test_to_pandas(split):
    df = split.to_pandas()
    assert list(df.index) == ["GPU0", "GPU1"]
    for col in ("vision", "layers", "head", "kv_cache", "activations", "logits", "context", "total", "capacity"):
        assert col in df.columns
    assert list(df["total"]) == pytest.approx([split.predicted()[0], split.predicted()[1]])
    assert list(df["capacity"]) == [24 * GiB, 24 * GiB]
    assert df.loc["GPU0", "vision"] > 0 and df.loc["GPU1", "vision"] == 0
    assert df.loc["GPU1", "head"] > 0 and df.loc["GPU0", "head"] == 0


def test_headroom(split):
    for i, room in split.headroom().items():
        assert room == pytest.approx(24 * GiB - split.predicted()[i])


def test_predicted_at_another_batch_is_that_batch_planned():
    """bench evens the planner's batch out over its images (240 -> 171 for 512): the prediction it
    compares with the measured peak must be the batch that ran, not the planner's."""
    p8 = vlmlab.plan("llava-1.5-7b", gpus="1x141GiB", strategy="single", batch_size=8, max_new_tokens=32)
    p171 = vlmlab.plan("llava-1.5-7b", gpus="1x141GiB", strategy="single", batch_size=171, max_new_tokens=32)
    assert p8.predicted(8) == p8.predicted()
    assert p8.predicted(171) == pytest.approx(p171.predicted())
    assert p8.predicted(171)[0] > 4 * p8.predicted()[0]
