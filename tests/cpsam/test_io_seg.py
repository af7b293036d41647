"""GUI-compatible NAME_seg.npy, outlines and overlays vs the cellpose package's own writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cellpose import io as cp_io
from cellpose import plot as cp_plot
from cellpose import utils as cp_utils
from conftest import load_golden_flows, read_golden_masks, read_shared_image

from cpsam import io
from cpsam.pairing import read_label_file
from cpsam.safe_npy import load_npy_dict

GOLDEN = ["cpm15_image01", "neurips22_cell_00849", "Fluo-N2DL-HeLa_01_t013"]


def golden(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masks = read_golden_masks(name)
    flows = load_golden_flows(name)
    return masks, flows["dP"], flows["cellprob"]


@pytest.mark.parametrize("name", GOLDEN)
def test_outlines_equal_cellpose(name: str) -> None:
    masks, _, _ = golden(name)
    np.testing.assert_array_equal(io.masks_to_outlines(masks), cp_utils.masks_to_outlines(masks))


@pytest.mark.parametrize("name", GOLDEN)
def test_flow_colours_equal_dx_to_circ(name: str) -> None:
    _, dP, _ = golden(name)
    np.testing.assert_array_equal(io.flows_to_rgb(dP), cp_plot.dx_to_circ(dP))


@pytest.mark.parametrize("name", GOLDEN[:2])
def test_seg_npy_equals_cellpose_masks_flows_to_seg(name: str, tmp_path: Path) -> None:
    masks, dP, cellprob = golden(name)
    image_file = tmp_path / "cp" / f"{name}.tif"
    image_file.parent.mkdir()
    cp_io.masks_flows_to_seg([np.zeros(masks.shape)], [masks], [[cp_plot.dx_to_circ(dP), dP, cellprob]],
                             [str(image_file)], channels=[0, 0])
    theirs = load_npy_dict(tmp_path / "cp" / f"{name}_seg.npy")  # the safe reader takes cellpose's file

    ours_path = io.write_seg_npy(tmp_path / f"{name}_seg.npy",
                                 io.seg_npy_dict(masks, dP, cellprob, image_file, channels=[0, 0]))
    ours = load_npy_dict(ours_path)
    np.testing.assert_array_equal(read_label_file(ours_path), masks)  # how prep, finetune and eval read it
    assert set(ours) == set(theirs)
    for key in ("outlines", "masks", "ismanual"):
        assert ours[key].dtype == theirs[key].dtype
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert ours["filename"] == theirs["filename"] and ours["chan_choose"] == theirs["chan_choose"]
    assert len(ours["flows"]) == len(theirs["flows"]) == 5
    for k in (0, 1, 2, 4):
        assert ours["flows"][k].dtype == theirs["flows"][k].dtype
        np.testing.assert_array_equal(ours["flows"][k], theirs["flows"][k])
    assert list(ours["flows"][3]) == list(theirs["flows"][3]) == []
    # what the GUI's _load_seg checks: flows[0].shape[-3] == masks.shape[-2]
    assert ours["flows"][0].shape[-3] == ours["masks"].shape[-2]
    assert not list(tmp_path.glob("*.part*"))


def test_overlay_png_round_trip(tmp_path: Path) -> None:
    masks, _, _ = golden("neurips22_cell_00849")
    image = read_shared_image("tissue_multiplex_neurips22", "neurips22_cell_00849")
    rgb = io.outline_overlay(image, masks)
    path = io.write_png(tmp_path / "x_outlines.png", rgb)
    back = io.read_image(path)
    np.testing.assert_array_equal(back, rgb)
    outline = io.masks_to_outlines(masks)
    assert (back[outline] == (255, 0, 0)).all()
    assert outline.sum() > 1000 and not (back[~outline] == (255, 0, 0)).all(axis=-1).any()
    with pytest.raises(ValueError, match="differ in size"):
        io.outline_overlay(image[:100], masks)
