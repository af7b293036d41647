"""The memory-lean autograd functions of CP-SAM's CPU training path equal plain autograd of the same ops,
and save what they promise (cpsam/models/lean_autograd.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import get_rel_pos

from cpsam.models import create_model
from cpsam.models.lean_autograd import GeluLinear, RelPosFlashAttention, augmented_qkv, decomposed_bias


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while running fn()."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def reference_attention(q, k, v, rel_h, rel_w, scale, height, width):
    bias_h, bias_w = decomposed_bias(q, rel_h, rel_w, height, width)
    q_aug, k_aug, v_aug = augmented_qkv(q, k, v, bias_h, bias_w, scale, height, width)
    return torch.nn.functional.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., : q.shape[-1]]


def attention_inputs(batch=2, heads=3, height=5, width=7, dim=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, height * width, dim, generator=gen, dtype=dtype, requires_grad=True)
               for _ in range(3))
    tables = [torch.randn(2 * n - 1, dim, generator=gen, dtype=dtype, requires_grad=True) for n in (height, width)]
    return q, k, v, tables


@pytest.mark.parametrize("height,width", [(5, 7), (4, 4)])
def test_rel_pos_flash_attention_equals_autograd(height: int, width: int) -> None:
    q, k, v, (table_h, table_w) = attention_inputs(height=height, width=width)
    scale = 8 ** -0.5
    grad = torch.randn(2, 3, height * width, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (reference_attention, RelPosFlashAttention.apply):
        for t in (q, k, v, table_h, table_w):
            t.grad = None
        rel_h, rel_w = get_rel_pos(height, height, table_h), get_rel_pos(width, width, table_w)
        out = fn(q, k, v, rel_h, rel_w, scale, height, width)
        out.backward(grad)
        results.append([out.detach().clone()] + [t.grad.clone() for t in (q, k, v, table_h, table_w)])
    for name, ref, lean in zip(("out", "dq", "dk", "dv", "d rel_h", "d rel_w"), *results, strict=True):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_rel_pos_flash_attention_gradcheck() -> None:
    """Against finite differences in float64 (the flash kernel runs in double on a CPU)."""
    q, k, v, (table_h, table_w) = attention_inputs(batch=1, heads=2, height=3, width=4, dim=4, dtype=torch.float64)

    def fn(q, k, v, table_h, table_w):
        return RelPosFlashAttention.apply(q, k, v, get_rel_pos(3, 3, table_h), get_rel_pos(4, 4, table_w),
                                          0.5, 3, 4)

    assert torch.autograd.gradcheck(fn, (q, k, v, table_h, table_w))


def test_gelu_linear_equals_autograd_and_saves_h_only() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 6, 32, generator=gen, requires_grad=True)
    lin = torch.nn.Linear(32, 16)
    grad = torch.randn(2, 6, 6, 16, generator=gen)
    ref = lin(torch.nn.functional.gelu(h))
    ref.backward(grad)
    ref_grads = [t.grad.clone() for t in (h, lin.weight, lin.bias)]
    for t in (h, lin.weight, lin.bias):
        t.grad = None
    out = GeluLinear.apply(h, lin.weight, lin.bias)
    out.backward(grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name, lean, expected in zip(("dh", "dW", "db"), (h.grad, lin.weight.grad, lin.bias.grad), ref_grads,
                                     strict=True):
        torch.testing.assert_close(lean, expected, rtol=1e-6, atol=1e-7, msg=name)
    plain = saved_bytes(lambda: lin(torch.nn.functional.gelu(h)))
    lean = saved_bytes(lambda: GeluLinear.apply(h, lin.weight, lin.bias))
    assert plain - lean == h.numel() * 4  # gelu(h) is no longer kept


def test_lean_training_equals_plain_on_cpsam_tiny_and_saves_memory() -> None:
    """A whole CP-SAM (tiny) forward + backward: same loss and gradients with and without the lean functions,
    and the saved activations shrink by the promised amount per block."""
    torch.manual_seed(0)
    lean_net = create_model("cpsam_tiny", layer_drop=0.0).float().train()
    plain_net = copy.deepcopy(lean_net)
    plain_net.set_lean_training(False)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for net in (plain_net, lean_net):
        y = net(x)[0]
        loss = (y.square() * torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape)).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    plain = saved_bytes(lambda: plain_net(x))
    lean = saved_bytes(lambda: lean_net(x))
    cfg = lean_net.config
    tokens, batch, dim = (256 // cfg.patch_size) ** 2, 2, cfg.embed_dim
    side = 256 // cfg.patch_size
    head_dim = dim // cfg.num_heads
    # per block: q', k', v', padded out (4 x aug) + two contiguous copies of q - qkv (3 d) - out (d), and gelu(h) (4 d)
    aug = head_dim + 2 * side
    attention = batch * cfg.num_heads * tokens * (4 * aug + 2 * head_dim - 4 * head_dim) * 4
    per_block = attention + batch * tokens * 4 * dim * 4
    assert plain - lean == pytest.approx(cfg.depth * per_block, rel=0.02)


def test_lean_path_is_not_used_without_gradients(cpsam_tiny) -> None:
    net = cpsam_tiny.float()
    x = torch.randn(1, 3, 256, 256)
    calls = []
    original = RelPosFlashAttention.forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    RelPosFlashAttention.forward = staticmethod(spy)
    try:
        with torch.no_grad():
            net(x)
        assert not calls
        net.train()
        net(x)[0].sum().backward()
        assert calls
    finally:
        RelPosFlashAttention.forward = staticmethod(original)
