"""RMSNorm layers on torch's fused kernel (vlmlab.run.fused_norms): which norms qualify, read from
the model by checking each class against its own forward; the outputs; and that nothing changes
where the fusion does not apply (the CPU, float32)."""
import pytest

from vlmlab.run import fused_norms as fn


def _norm(cls_path, hidden=64):
    import importlib

    import torch

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    norm = cls(hidden, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, hidden))
    return norm


@pytest.mark.parametrize("cls_path,fused", [
    ("transformers.models.llama.modeling_llama.LlamaRMSNorm", True),
    ("transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm", True),
    ("transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm", False),  # scales by 1 + weight
])
def test_a_norm_is_fused_only_where_it_computes_the_same(cls_path, fused):
    import torch

    norm = _norm(cls_path)
    model = torch.nn.Sequential(norm)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    before = norm(x)
    assert fn.fuse_rms_norms(model) == []  # on the CPU: never
    assert fn.fuse_rms_norms(model, device_types=("cpu",)) == ([type(norm).__name__] if fused else [])
    after = norm(x)
    assert torch.allclose(before.float(), after.float(), atol=2e-2, rtol=2e-2)
    assert ("forward" in vars(norm)) is fused
    fn.unfuse(model)
    assert "forward" not in vars(norm) and torch.equal(norm(x), before)


def test_float32_and_other_modules_are_left_alone():
    import torch

    norm = _norm("transformers.models.llama.modeling_llama.LlamaRMSNorm").float()
    model = torch.nn.Sequential(norm, torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    assert fn.fuse_rms_norms(model, device_types=("cpu",)) == []
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_loaded_model_on_the_cpu_keeps_its_own_norms_and_rotation():
    """Both load-time substitutions (fused_norms, fast_rotary) are for a GPU only."""
    import vlmlab

    lm = vlmlab.load(None, gpus="cpu", force=True)
    try:
        assert lm.model.__dict__.get("_vlmlab_fused_norms") == []
        assert lm.model.__dict__.get("_vlmlab_fast_rotary") == []
    finally:
        vlmlab.unload(lm)


def test_a_norm_that_takes_more_than_the_hidden_states_is_left_alone():
    import torch

    class ResidualRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
            self.eps = 1e-6

        def forward(self, hidden_states, residual=None):
            hidden_states = hidden_states if residual is None else hidden_states + residual
            return torch.nn.functional.rms_norm(hidden_states, (64,), self.weight, self.eps)

    assert fn.fuse_rms_norms(torch.nn.Sequential(ResidualRMSNorm()), device_types=("cpu",)) == []
