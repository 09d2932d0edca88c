"""The rotary embedding in three kernels (vlmlab.run.fast_rotary): the same numbers as transformers'
own rotation, which modeling modules qualify (checked against themselves), and that nothing changes
where it does not apply (the CPU unless asked, float32, an interleaved rotation)."""
import pytest

from vlmlab.run import fast_rotary as fr


@pytest.fixture(autouse=True)
def _restored():
    yield
    fr.restore()


def _tiny_llama(dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def test_rotate_is_transformers_rotation_on_a_transposed_layout():
    import torch
    from transformers.models.llama.modeling_llama import rotate_half

    x = torch.randn(2, 7, 4, 16).transpose(1, 2)  # [batch, heads, seq, dim] over [batch, seq, heads, dim], as projected
    cos, sin = torch.randn(2, 1, 7, 16), torch.randn(2, 1, 7, 16)
    assert torch.allclose(fr.rotate(x, cos, sin), x * cos + rotate_half(x) * sin, atol=1e-6)


def test_a_llama_in_half_precision_gets_it_and_computes_the_same():
    import torch
    from transformers.models.llama import modeling_llama

    model = _tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    original = modeling_llama.apply_rotary_pos_emb
    assert fr.use_fast_rotary(model) == []  # on the CPU: only when asked
    assert fr.use_fast_rotary(model, device_types=("cpu",)) == ["transformers.models.llama.modeling_llama"]
    assert modeling_llama.apply_rotary_pos_emb is not original
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before.float(), after.float(), atol=5e-2, rtol=5e-2)
    fr.use_fast_rotary(model, device_types=("cpu",))  # again: wraps the original, not its own replacement
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is original
    fr.restore()
    assert modeling_llama.apply_rotary_pos_emb is original


def test_float32_and_other_devices_go_to_the_original():
    import torch
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    assert fr.use_fast_rotary(_tiny_llama(torch.float32), device_types=("cpu",)) == []
    assert modeling_llama.apply_rotary_pos_emb is original
    fr.use_fast_rotary(_tiny_llama(torch.bfloat16), device_types=("cpu",))
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    for got, expected in zip(modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), original(q, k, cos, sin)):
        assert torch.equal(got, expected)  # float32: the original ran


def test_a_partial_rotation_at_run_time_goes_to_the_original():
    import torch
    from transformers.models.llama import modeling_llama

    def partial_rotation(q, k, cos, sin, unsqueeze_dim=1):  # glm-style: rotates only cos's width of q
        width = cos.shape[-1]
        (qr, qp), (kr, kp) = q.split([width, q.shape[-1] - width], -1), k.split([width, k.shape[-1] - width], -1)
        qr, kr = original(qr, kr, cos, sin, unsqueeze_dim)
        return torch.cat([qr, qp], -1), torch.cat([kr, kp], -1)

    original = modeling_llama.apply_rotary_pos_emb
    replacement = fr._replacement(partial_rotation, ("cpu",))
    q, k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16), torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 3, 4, dtype=torch.bfloat16), torch.randn(1, 3, 4, dtype=torch.bfloat16)
    for got, expected in zip(replacement(q, k, cos, sin), partial_rotation(q, k, cos, sin)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("family,same", [("llama", True), ("qwen2", True), ("cohere", False)])  # cohere interleaves
def test_the_check_reads_each_family_from_its_own_function(family, same):
    import importlib

    import torch

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    assert fr._takes_plain_arguments(modeling.apply_rotary_pos_emb)
    assert fr._same_as_original(modeling.apply_rotary_pos_emb, torch.device("cpu"), torch.bfloat16) is same

