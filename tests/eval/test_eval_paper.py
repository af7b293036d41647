"""The paper's evaluation conventions (eval/paper.py) and the human-consensus bound."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from eval import paper


def test_paper_channel_placement():
    gray = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = paper.paper_channels(gray)
    assert out.shape == (3, 3, 4) and not out[:2].any() and np.array_equal(out[2], gray[0])
    two = np.stack([gray[0], gray[0] + 100])
    out = paper.paper_channels(two)
    assert not out[0].any() and np.array_equal(out[1:], two)
    four = np.stack([gray[0] + k for k in range(4)])
    assert np.array_equal(paper.paper_channels(four), four[:3])


def test_niter_2000_only_for_bacteria():
    assert paper.niter_for("bact_phase_neurips22") == 2000
    assert paper.niter_for("Omnipose_bac_phase") == 2000
    assert paper.niter_for("fluo_nuclei_deepcell2016") is None


def test_consensus_bound_is_half_the_second_annotators_error():
    a = np.zeros((40, 40), np.int32)
    a[2:12, 2:12], a[20:30, 20:30], a[2:12, 25:35] = 1, 2, 3
    b = a.copy()
    b[b == 3] = 0  # the second annotator missed one of three cells: FN = 1, TP = 2 -> error (0 + 1) / 3
    assert paper.consensus_error([a, a], [a, b]) == pytest.approx((0.0 + 1 / 3) / 2 / 2)
    with pytest.raises(ValueError):
        paper.consensus_error([a], [])


def test_table_averages_per_image_then_over_datasets():
    rows = [{"dataset": "x", "ap50": 1.0, "ap75": 0.5, "ap90": 0.0, "err50": 0.0},
            {"dataset": "x", "ap50": 0.0, "ap75": 0.5, "ap90": 0.0, "err50": 1.0},
            {"dataset": "y", "ap50": 0.5, "ap75": 0.5, "ap90": 0.5, "err50": 0.5}]
    t = paper.table(rows)
    assert [r["dataset"] for r in t] == ["x", "y", "mean over datasets"]
    assert t[0]["ap50"] == 0.5 and t[2]["ap50"] == pytest.approx(0.5) and t[2]["images"] == 3


def test_cli_on_a_real_bacterial_set_uses_niter_2000(tmp_path):
    folder = shared_path("data", "bact_phase_neurips22")
    from cpsam.cli import main

    second = tmp_path / "second"
    second.mkdir()
    import tifffile

    masks = tifffile.imread(next(folder.glob("*_masks.tif")))
    name = next(folder.glob("*_masks.tif")).name
    tifffile.imwrite(second / name, masks)  # a second annotator identical to the first: bound 0
    out = tmp_path / "out"
    assert main(["eval", "paper", "--model", "cyto_0", "--data", str(folder), "--out", str(out),
                 "--second-annotator", str(second), "--quiet"]) == 0
    rows = (out / "paper_images.csv").read_text().splitlines()
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(","), strict=True))
    assert first["niter"] == "2000" and 0.0 <= float(first["ap50"]) <= 1.0
    assert "Human-consensus bound" in (out / "paper_table.md").read_text()
    assert "0.0000" in (out / "paper_table.md").read_text().split("bound")[-1]
    assert (out / "paper_error_rate.png").stat().st_size > 1000
