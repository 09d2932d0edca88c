"""Dry runs (``vlmlab.run.dry_run``): caption-shaped generates on dummy inputs; an out-of-memory
batch is halved and tried again instead of ending the bench (seen on an H200: qwen2.5-vl-7b)."""
import pytest

torch = pytest.importorskip("torch")

from vlmlab.run.dry_run import synthetic_batch  # noqa: E402


def test_an_oom_batch_is_halved_and_the_run_goes_on(lm, monkeypatch):
    real, sizes = lm.model.generate, []

    def generate(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.86 GiB")
        return real(**kw)

    monkeypatch.setattr(lm.model, "generate", generate)
    rows = synthetic_batch(lm, 6, batch_size=4, max_new_tokens=2)
    assert sizes == [4, 2, 2, 2]
    assert [r["image"] for r in rows] == [f"synthetic:{i}" for i in range(6)]
    assert {r["batch_size"] for r in rows} == {2} and all(r["n_tokens"] == 2 for r in rows)


def test_other_errors_and_an_oom_at_batch_one_are_raised(lm, monkeypatch):
    def generate(**kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lm.model, "generate", generate)
    with pytest.raises(torch.OutOfMemoryError):
        synthetic_batch(lm, 2, batch_size=2, max_new_tokens=2)

    monkeypatch.setattr(lm.model, "generate", lambda **kw: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(ValueError, match="bad input"):
        synthetic_batch(lm, 2, batch_size=2, max_new_tokens=2)
