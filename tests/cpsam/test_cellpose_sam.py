"""CP-SAM network: equivalence with cellpose 4's CPSAM, both attention paths, layer drop, bf16, shapes."""

from __future__ import annotations

import pytest
import torch

from cpsam.models import CellposeSAM, create_model, list_models, load_model
from cpsam.models.cellpose_sam import VARIANTS


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every trainable tensor random values (SAM initialises pos-embed and rel-pos tables to 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen) * 0.02
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "neck.1.weight", "neck.3.weight")) else 0.0
            param.copy_(noise + base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def official_vit_l(tmp_path_factory):
    """cellpose 4's CPSAM with random weights, its state_dict saved as an official file, and its output."""
    from cellpose.vit import CPSAM

    torch.manual_seed(0)
    reference = CPSAM().eval()
    randomize_(reference, seed=1)
    path = tmp_path_factory.mktemp("weights") / "cpsam_random"
    torch.save(reference.state_dict(), path)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, style = reference(x)
    del reference
    return path, x, expected, style


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_vit_l_equals_cellpose_cpsam(official_vit_l, attention):
    path, x, expected, ref_style = official_vit_l
    model = load_model(path, attention=attention)
    assert isinstance(model, CellposeSAM) and model.attention_path == attention
    with torch.no_grad():
        y, style = model(x)
    assert y.shape == (1, 3, 256, 256)
    assert rel_err(y, expected) <= 1e-5
    assert torch.equal(style, ref_style)  # both zeros (B, 256)
    # the outputs are not trivially small: the comparison means something
    assert float(expected.abs().max()) > 0.1


def test_official_state_dict_layout_matches_spec():
    """cpsam_recipe.md 1.4: 350 tensors, 304,628,930 values, rel-pos 27 / 127 rows."""
    with torch.device("meta"):
        model = create_model("cpsam_vit_l")
    sd = model.state_dict()
    assert len(sd) == 350
    assert sum(v.numel() for v in sd.values()) == 304_628_930
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 304_592_064
    assert sd["W2"].shape == (192, 3, 8, 8)
    assert sd["encoder.pos_embed"].shape == (1, 32, 32, 1024)
    assert sd["encoder.patch_embed.proj.weight"].shape == (1024, 3, 8, 8)
    for i in range(24):
        rows = 127 if i in (5, 11, 17, 23) else 27
        assert sd[f"encoder.blocks.{i}.attn.rel_pos_h"].shape == (rows, 64)
        assert sd[f"encoder.blocks.{i}.attn.rel_pos_w"].shape == (rows, 64)
    assert sd["out.weight"].shape == (192, 256, 1, 1)


@pytest.mark.parametrize("name", ["cpsam_vit_b", "cpsam_vit_l", "cpsam_vit_h", "cpsam_tiny"])
def test_every_variant_builds_with_the_sam_geometry(name):
    assert name in list_models()
    with torch.device("meta"):
        model = create_model(name)
    spec = VARIANTS[name]
    assert len(model.encoder.blocks) == spec["depth"]
    head_dim = spec["embed_dim"] // spec["num_heads"]
    for i, block in enumerate(model.encoder.blocks):
        assert block.window_size == 0
        rows = 127 if i in spec["global_attn_indexes"] else 27
        assert block.attn.rel_pos_h.shape == (rows, head_dim)
    assert model.encoder.pos_embed.shape == (1, 32, 32, spec["embed_dim"])


def test_tiny_forward_and_paths_agree(cpsam_tiny):
    model = cpsam_tiny
    randomize_(model, seed=3)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        model.set_attention_path("math")
        y_math, _ = model(x)
        model.set_attention_path("sdpa")
        y_sdpa, _ = model(x)
    assert y_math.shape == (2, 3, 256, 256)
    assert rel_err(y_sdpa, y_math) <= 1e-5


def test_sdpa_path_gradients_match_math_path():
    torch.manual_seed(0)
    model = create_model("cpsam_tiny", layer_drop=0.0)
    randomize_(model, seed=4)
    x = torch.randn(1, 3, 256, 256)
    grads = {}
    for path in ("math", "sdpa"):
        model.zero_grad()
        model.set_attention_path(path)
        model(x)[0].square().mean().backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads["math"].items():
        assert rel_err(grads["sdpa"][name], g) <= 1e-4, name


@pytest.mark.parametrize("mask_rows", [0, 1, 7 * 4, 4 * 64])
def test_both_sdpa_implementations_equal_sam_math_attention(mask_rows):
    """The CPU chunked-mask kernel (uneven and single-row chunks included) and the augmented kernel
    (used on CUDA) against SAM's own attention: values and input gradients, batch 2, ViT-L head size."""
    from segment_anything.modeling.image_encoder import Attention

    from cpsam.models.attention import RelPosAttention

    torch.manual_seed(0)
    sam = Attention(dim=256, num_heads=4, use_rel_pos=True, input_size=(16, 16))
    with torch.no_grad():
        sam.rel_pos_h.normal_(0, 0.5)
        sam.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, 16, 16, 256, requires_grad=True)
    expected = sam(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    ours = RelPosAttention.adopt(sam, "sdpa")
    q, k, v = ours.qkv(x).reshape(2, 256, 3, 4, 64).permute(2, 0, 3, 1, 4).unbind(0)
    chunked = ours._chunked_mask_attention(q, k, v, 16, 16, mask_rows=mask_rows)
    augmented = ours._augmented_attention(q, k, v, 16, 16).transpose(1, 2)
    for out in (chunked, augmented):
        y = ours.proj(out.reshape(2, 16, 16, 256))
        assert rel_err(y, expected) <= 1e-5
        (grad,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
        assert rel_err(grad, expected_grad) <= 1e-4


def test_pixel_shuffle_readout_equals_reference_transposed_conv(cpsam_tiny):
    model = cpsam_tiny
    feats = torch.randn(2, model.config.out_chans, 32, 32)
    reference = torch.nn.functional.conv_transpose2d(model.out(feats), model.W2, stride=8)
    assert torch.equal(model.readout(feats), reference)


def test_fewer_input_channels_equal_zero_padding(cpsam_tiny):
    model = cpsam_tiny
    randomize_(model, seed=5)
    gray = torch.randn(1, 1, 256, 256)
    padded = torch.cat([gray, torch.zeros(1, 2, 256, 256)], dim=1)
    with torch.no_grad():
        assert rel_err(model(gray)[0], model(padded)[0]) <= 1e-6


def test_wrong_tile_size_is_a_clear_error(cpsam_tiny):
    model = cpsam_tiny
    with pytest.raises(ValueError, match="256x256 tiles"):
        model(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="at most 3 input channels"):
        model(torch.zeros(1, 4, 256, 256))


def test_layer_drop_is_per_sample_identity_with_linear_rates():
    torch.manual_seed(0)
    model = create_model("cpsam_tiny", depth=4, global_attn_indexes=(3,), layer_drop=0.6)
    randomize_(model, seed=6)
    assert torch.allclose(model.layer_drop_rates(), torch.tensor([0.0, 0.2, 0.4, 0.6]))
    x = torch.randn(6, 3, 256, 256)
    model.train()
    torch.manual_seed(123)
    drop = torch.rand(6, 4) < model.layer_drop_rates()
    torch.manual_seed(123)
    with torch.no_grad():
        got = model(x)[0]
    assert drop.any() and not drop[:, 0].any()  # block 0 is never dropped
    model.eval()
    expected = []
    with torch.no_grad():
        for b in range(6):
            tokens = model.embed(x[b : b + 1])
            for i, block in enumerate(model.encoder.blocks):
                if not drop[b, i]:
                    tokens = block(tokens)
            expected.append(model.readout(model.encoder.neck(tokens.permute(0, 3, 1, 2))))
    assert rel_err(got, torch.cat(expected)) <= 1e-5
    # eval mode: no drop at all, deterministic
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])


def test_layer_drop_keeps_every_parameter_in_the_graph():
    """Even a block dropped for the whole batch gets a (zero) gradient, so DDP sees every parameter."""
    torch.manual_seed(0)
    model = create_model("cpsam_tiny", depth=2, global_attn_indexes=(1,), layer_drop=0.99).train()
    torch.manual_seed(7)  # with p=0.99 the last block is dropped for the single sample
    model(torch.randn(1, 3, 256, 256))[0].mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_layer_drop_rate_statistics():
    """In training forwards, the fraction of samples each block processes is 1 - its drop rate."""
    torch.manual_seed(0)
    model = create_model("cpsam_tiny", depth=5, global_attn_indexes=(4,), layer_drop=0.4).train()
    processed = [0] * 5
    for i, block in enumerate(model.encoder.blocks):
        block.register_forward_hook(lambda mod, inp, out, i=i: processed.__setitem__(i, processed[i] + len(inp[0])))
    x = torch.randn(16, 3, 256, 256)
    with torch.no_grad():
        for _ in range(8):
            model(x)
    kept = torch.tensor(processed, dtype=torch.float32) / (8 * 16)
    assert kept[0] == 1.0  # block 0 is never dropped
    assert torch.allclose(kept, 1 - model.layer_drop_rates(), atol=0.1), kept


def test_bf16_inference_close_to_fp32(cpsam_tiny):
    model = cpsam_tiny
    randomize_(model, seed=8)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        y32 = model(x)[0]
        y16 = model.to(torch.bfloat16)(x)[0]
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y32) <= 0.05
