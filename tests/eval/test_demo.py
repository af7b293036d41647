"""`cpsam demo`: the pretrained cyto_0 network segments the demo images well and writes its files."""

from __future__ import annotations

import pytest

from eval.demo import print_table, run_demo, stardist_nuclei_sample


def test_demo_segments_synthetic_and_real_nuclei(tmp_path, capsys):
    if stardist_nuclei_sample() is None:
        pytest.skip("stardist (a dev dependency) is not installed: no real nuclei sample")
    rows = run_demo(tmp_path, device="cpu", batch_size=8)
    images = {r["image"]: r for r in rows[:-1]}
    assert len(images) == 6
    # cellpose 3.1.1.2 + cyto_0 reached AP@0.5 0.83 on a DSB 2018 image at this diameter
    assert images["dsb2018_nuclei"]["ap50"] >= 0.8
    for name, row in images.items():
        if name.startswith("synthetic_"):
            assert row["ap50"] >= 0.85, (name, row)
            assert abs(row["cells"] - row["true_cells"]) <= 0.1 * row["true_cells"]
        assert (tmp_path / f"{name}_masks.tif").is_file()
        assert (tmp_path / f"{name}_outlines.png").stat().st_size > 10_000
    assert not list(tmp_path.glob(".*part*"))
    print_table(rows)
    assert "6 images" in capsys.readouterr().out
