"""The invariance benchmark (eval/invariance.py): the degradations do what the paper's levels say, and a
real model's AP falls as the noise grows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from eval import invariance as inv


@pytest.fixture(scope="module")
def hela_item() -> inv.LabelledImage:
    items = inv.load_labelled_images(shared_path("data", "fluo_nuclei_ctc_N2DL-HeLa"), max_per_folder=1)
    item = items[0]
    # a 256 x 320 crop keeps the test fast; labels cut by the crop stay (they are scored as they are)
    return inv.LabelledImage(item.dataset, item.name, item.image[:, 200:456, 300:620].copy(),
                             item.masks[200:456, 300:620].copy())


def test_loaded_images_are_three_normalized_channels(hela_item):
    img = hela_item.image
    assert img.shape[0] == 3 and img.dtype == np.float32
    assert np.all(img[1:] == 0)  # grayscale goes to channel 0, the rest zero
    # 1-99 % normalization of the whole image: the crop's values lie around [0, 1]
    assert -0.1 < float(np.percentile(img[0], 1)) and float(np.percentile(img[0], 99)) < 3.0


def test_poisson_noise_grows_as_the_photon_scale_falls(hela_item):
    correlations = []
    for level in inv.LEVELS["poisson"]:
        noisy, masks = inv.degrade(hela_item, "poisson", level)
        assert masks is hela_item.masks and noisy.shape == hela_item.image.shape
        correlations.append(float(np.corrcoef(noisy[0].ravel(), hela_item.image[0].ravel())[0, 1]))
    assert 1.0 > correlations[0] > correlations[1] > correlations[2] > 0.0, correlations
    again, _ = inv.degrade(hela_item, "poisson", 2.5)
    assert np.array_equal(again, inv.degrade(hela_item, "poisson", 2.5)[0])  # reproducible draws


def test_size_series_reaches_the_target_mean_diameter(hela_item):
    for target in (15.0, 60.0):
        image, masks = inv.degrade(hela_item, "size", target)
        assert image.shape[1:] == masks.shape
        assert abs(inv.mean_diameter(masks) - target) / target < 0.08


def test_downsampling_and_channel_order():
    rng = np.random.default_rng(0)
    img = np.zeros((3, 64, 64), np.float32)
    img[0] = rng.random((64, 64))
    item = inv.LabelledImage("d", "x", img, np.ones((64, 64), np.int32))
    smooth, _ = inv.degrade(item, "downsample", 5)
    assert np.abs(np.diff(smooth[0], axis=1)).mean() < 0.5 * np.abs(np.diff(img[0], axis=1)).mean()
    aniso, _ = inv.degrade(item, "anisotropic", 6)  # Y only: rows become smooth, columns keep their detail
    assert np.abs(np.diff(aniso[0], axis=0)).mean() < 0.5 * np.abs(np.diff(aniso[0], axis=1)).mean()
    brg, _ = inv.degrade(item, "channels", "BRG")
    assert np.array_equal(brg[1], img[0]) and not brg[0].any()


def test_cyto0_ap_falls_with_shot_noise(hela_item):
    from cpsam.models.pretrained import pretrained

    model = pretrained("cyto_0").eval()
    rows = inv.run_benchmark(model, [hela_item], kinds=["poisson"], progress=False)
    summary = {r["level"]: r["ap50"] for r in inv.summarize(rows)}
    assert summary["0"] > 0.7  # cyto_0 at the true diameter segments clean HeLa nuclei well
    assert summary["0"] > summary["5.0"] > summary["0.5"]


def test_cli_runs_on_a_cpsam_checkpoint(hela_item, tmp_path, cpsam_tiny):
    """`cpsam eval invariance` on a CP-SAM checkpoint (cpsam_tiny, random weights in our checkpoint format): the
    same code path as cyto_0 (Segmenter under the cellpose-4 rules), every channel order scored and plotted."""
    import csv

    from cpsam.cli import main
    from cpsam.io import write_labels
    from cpsam.models.loading import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "cpsam_tiny.pt", cpsam_tiny)
    data = tmp_path / "data"
    data.mkdir()
    import tifffile

    tifffile.imwrite(data / "hela_crop_img.tif", hela_item.image[0])
    write_labels(data / "hela_crop_masks.tif", hela_item.masks)
    out = tmp_path / "out"
    assert main(["eval", "invariance", "--model", str(ckpt), "--data", str(data), "--out", str(out),
                 "--kinds", "channels", "--quiet"]) == 0
    with open(out / "invariance_summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert {r["level"] for r in summary} >= {"RGB", "BRG", "GBR", "random"}
    assert all(0.0 <= float(r["ap50"]) <= 1.0 for r in summary)
    assert (out / "invariance.png").stat().st_size > 5_000
