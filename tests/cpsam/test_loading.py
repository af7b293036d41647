"""Weight loading: SAM initialisation, official Cellpose-SAM files, our checkpoints, clear errors."""

from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry

from cpsam.models import CellposeSAM, CheckpointError, create_model, identify_checkpoint, load_model, save_checkpoint
from cpsam.models.loading import (
    cellpose_sam_from_sam,
    cellpose_sam_from_state_dict,
    cpsam_config_from_state_dict,
    load_sam_encoder,
)


def random_sam_state_dict(variant: str, seed: int) -> dict[str, torch.Tensor]:
    """A SAM checkpoint in the official key layout (image_encoder/prompt_encoder/mask_decoder), random values.

    The layout comes from segment_anything's own builder on meta tensors (no 1.2 GB ViT-L init);
    the values are seeded normals, so every tensor differs from what a fresh model would hold.
    """
    with torch.device("meta"):
        layout = sam_model_registry[variant](None).state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in layout.items()}


@pytest.fixture(scope="module")
def sam_vit_b_file(tmp_path_factory):
    sd = random_sam_state_dict("vit_b", seed=0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(sd, path)
    return path, sd


def assert_resampled_as_the_spec_says(model: CellposeSAM, sam: dict[str, torch.Tensor], global_blocks) -> None:
    """cpsam_recipe.md 1.2: kernel taps [::2, ::2] unscaled, new patch bias, pos-embed [::2, ::2], rest copied."""
    enc = model.encoder.state_dict()
    # patch kernel: 16x16 taps at even rows/cols, no rescaling
    assert torch.equal(enc["patch_embed.proj.weight"], sam["image_encoder.patch_embed.proj.weight"][:, :, ::2, ::2])
    # the patch bias is the new conv's own (the reference does not copy SAM's)
    assert not torch.equal(enc["patch_embed.proj.bias"], sam["image_encoder.patch_embed.proj.bias"])
    # position embeddings: 64x64 grid subsampled ::2 -> 32x32
    assert torch.equal(enc["pos_embed"], sam["image_encoder.pos_embed"][:, ::2, ::2])
    assert enc["pos_embed"].shape == (1, 32, 32, model.config.embed_dim)
    # everything else copied unchanged, rel-pos tables keep their 27 / 127 rows
    copied = [k for k in enc if not k.startswith(("patch_embed", "pos_embed"))]
    assert len(copied) == len(enc) - 3
    for key in copied:
        assert torch.equal(enc[key], sam[f"image_encoder.{key}"]), key
    for i, block in enumerate(model.encoder.blocks):
        assert block.attn.rel_pos_h.shape[0] == (127 if i in global_blocks else 27)
        assert block.attn.rel_pos_w.shape[0] == (127 if i in global_blocks else 27)
        assert block.window_size == 0


def test_sam_checkpoint_resampled_as_the_spec_says(sam_vit_b_file):
    path, sam = sam_vit_b_file
    assert identify_checkpoint(sam) == "sam"
    model = cellpose_sam_from_sam(path)
    assert isinstance(model, CellposeSAM) and model.config.embed_dim == 768 and model.config.depth == 12
    assert_resampled_as_the_spec_says(model, sam, global_blocks=(2, 5, 8, 11))


def test_sam_vit_l_checkpoint_resampled_as_the_spec_says(tmp_path):
    """The paper's initialisation: a random ViT-L SAM file (1.2 GB, official layout) loads and resamples."""
    sam = random_sam_state_dict("vit_l", seed=3)
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(sam, path)
    model = cellpose_sam_from_sam(path)
    path.unlink()
    assert model.config.embed_dim == 1024 and model.config.depth == 24 and model.config.num_heads == 16
    assert_resampled_as_the_spec_says(model, sam, global_blocks=(5, 11, 17, 23))
    # the trained network's layout: 350 tensors once the readout is added (cpsam_recipe.md 1.4)
    assert len(model.state_dict()) == 350


def test_sam_checkpoint_of_the_wrong_width_is_refused(sam_vit_b_file):
    _, sam = sam_vit_b_file
    model = create_model("cpsam_tiny")
    with pytest.raises(CheckpointError, match="does not fit a Cellpose-SAM of width 64"):
        load_sam_encoder(model, sam, "sam_vit_b.pth")


def test_sam_checkpoint_given_to_load_model_says_how_to_use_it(sam_vit_b_file):
    path, _ = sam_vit_b_file
    with pytest.raises(CheckpointError, match="cellpose_sam_from_sam"):
        load_model(path)


def tiny_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model("cpsam_tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.state_dict()


def outputs(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)[0]


def test_config_inferred_from_official_layout():
    sd = tiny_official_state_dict()
    cfg = cpsam_config_from_state_dict(sd)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.global_attn_indexes) == (64, 2, 4, (1,))
    assert (cfg.patch_size, cfg.tile_size, cfg.nout, cfg.out_chans) == (8, 256, 3, 32)
    with torch.device("meta"):
        vit_l = create_model("cpsam_vit_l").state_dict()
    cfg_l = cpsam_config_from_state_dict(vit_l)
    assert (cfg_l.embed_dim, cfg_l.depth, cfg_l.num_heads, cfg_l.global_attn_indexes) == (1024, 24, 16, (5, 11, 17, 23))


def test_module_prefix_and_known_unused_keys_are_accepted(tmp_path):
    sd = tiny_official_state_dict()
    reference = cellpose_sam_from_state_dict(sd)
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    prefixed["module.encoder.size_embed"] = torch.zeros(32, 64)  # the paper's unused parameter
    path = tmp_path / "cpsam_ddp"
    torch.save(prefixed, path)
    loaded = load_model(path)
    assert torch.equal(outputs(loaded), outputs(reference))


def test_every_tensor_is_accounted_for(tmp_path):
    sd = tiny_official_state_dict()
    extra = dict(sd, **{"encoder.mystery": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(e.g. \['encoder.mystery'\]\)"):
        cellpose_sam_from_state_dict(extra, "x.pt")
    missing = {k: v for k, v in sd.items() if k != "out.bias"}
    with pytest.raises(CheckpointError, match=r"missing \(e.g. \['out.bias'\]\)"):
        cellpose_sam_from_state_dict(missing, "x.pt")
    no_w2 = {k: v for k, v in sd.items() if k != "W2"}
    with pytest.raises(CheckpointError, match="no 'W2' tensor"):
        cellpose_sam_from_state_dict(no_w2, "x.pt")
    bad_w2 = dict(sd, W2=torch.randn_like(sd["W2"]))
    with pytest.raises(CheckpointError, match="identity pixel-shuffle"):
        cellpose_sam_from_state_dict(bad_w2, "x.pt")
    dino = dict(sd, **{"encoder.cls_token": torch.zeros(1, 1, 64)})
    with pytest.raises(CheckpointError, match="Cellpose-DINO"):
        cellpose_sam_from_state_dict(dino, "x.pt")


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("cpsam_tiny", attention="math")
    with torch.no_grad():
        model.out.bias.add_(0.5)
        model.diam_labels.fill_(17.0)
    path = save_checkpoint(tmp_path / "run" / "last.pt", model, epoch=3, config={"lr": 5e-5})
    assert not list(path.parent.glob(".*part*"))  # atomic: no temporary left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cpsam-checkpoint" and raw["epoch"] == 3 and raw["config"] == {"lr": 5e-5}
    loaded = load_model(path, attention="sdpa")
    assert isinstance(loaded, CellposeSAM) and loaded.attention_path == "sdpa"
    assert float(loaded.diam_labels) == 17.0
    assert (outputs(loaded) - outputs(model)).abs().max() <= 1e-5 * outputs(model).abs().max()


def test_bf16_model_is_saved_as_float32(tmp_path):
    model = create_model("cpsam_tiny").to(torch.bfloat16)
    path = save_checkpoint(tmp_path / "bf16.pt", model)
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())


def test_classic_cellpose_file_is_recognised(tmp_path, cyto0_file):
    path = cyto0_file
    sd = torch.load(path, weights_only=True)
    assert identify_checkpoint(sd) == "cellpose-classic"
    with pytest.raises(CheckpointError, match="classic Cellpose"):
        cellpose_sam_from_state_dict(sd, str(path))
    model = load_model(path)
    assert type(model).__name__ == "CPnet"
    assert float(model.diam_mean) == 27.0


def test_wrong_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: file is empty"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")
    random_pth = tmp_path / "random.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, random_pth)
    with pytest.raises(CheckpointError, match=r"not a recognised weight file: found a mapping with keys \['fc.weight'"):
        load_model(random_pth)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError, match="an object of type Tensor"):
        load_model(tensor_file)
    good = tmp_path / "good.pth"
    torch.save(tiny_official_state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a readable torch weight file"):
        load_model(text)


def test_student_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    student = create_model("cpnet", nbase=[1, 32, 64]).eval()
    path = save_checkpoint(tmp_path / "student.pt", student, teacher="cyto_0")
    loaded = load_model(path)
    assert type(loaded).__name__ == "CPnet" and list(loaded.nbase) == [1, 32, 64]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], student(x)[0])
