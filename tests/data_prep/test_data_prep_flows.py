"""`cpsam prep flows`: the flow cache of a canonical dataset, computed by cpsam.dynamics."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from cellpose.dynamics import masks_to_flows_gpu

from cpsam.cli import main
from cpsam.dynamics import masks_to_flows
from data_prep import flows as flows_mod
from data_prep.canonical import CanonicalDataset
from data_prep.flows import fill_flow_cache
from data_prep.synthetic import SyntheticConfig, write_synthetic_dataset


def test_flow_cache_matches_cellpose_and_is_incremental(tmp_path, capsys):
    write_synthetic_dataset(tmp_path, 3, SyntheticConfig(shape=(96, 112), diameter=24), seed=2)
    assert main(["prep", "flows", str(tmp_path), "--workers", "2"]) == 0
    assert "3 flow files written" in capsys.readouterr().out
    ds = CanonicalDataset(tmp_path)
    for i in range(len(ds)):
        flows = ds.flows(i)
        assert flows.dtype == np.float32 and flows.shape == (2, 96, 112)
        mask = ds.mask(i)
        np.testing.assert_array_equal(flows, masks_to_flows(mask))
        ref, _ = masks_to_flows_gpu(mask.astype(np.int64), device=torch.device("cpu"))
        np.testing.assert_allclose(flows, ref, atol=1e-5)  # [dY, dX] in cellpose's order
        assert not flows[:, mask == 0].any()
        norm = np.sqrt((flows**2).sum(0))[mask > 0]
        assert np.median(norm) > 0.9  # unit vectors inside cells
    # incremental: only missing files are computed; --force recomputes everything
    ds.flow_path(1).unlink()
    mtime = ds.flow_path(0).stat().st_mtime_ns
    assert fill_flow_cache(tmp_path, progress=False) == 1
    assert ds.flow_path(0).stat().st_mtime_ns == mtime and ds.has_flows(1)
    assert fill_flow_cache(tmp_path, progress=False) == 0
    assert fill_flow_cache(tmp_path, force=True, progress=False) == 3
    assert not list((tmp_path / "flows").glob(".*"))  # no temporary files left


def test_bad_flow_file_is_reported(tmp_path):
    write_synthetic_dataset(tmp_path, 1, SyntheticConfig(shape=(64, 64), diameter=20), seed=0)
    ds = CanonicalDataset(tmp_path)
    ds.flow_path(0).parent.mkdir()
    tifffile.imwrite(ds.flow_path(0), np.zeros((2, 10, 10), np.float32), photometric="minisblack")
    try:
        ds.flows(0)
    except ValueError as exc:
        assert "flow cache must be (2, H, W)" in str(exc) and ds[0].name in str(exc)
    else:
        raise AssertionError("a flow file of the wrong shape was accepted")


@pytest.mark.slow
def test_flow_cache_in_worker_processes(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path, 4, SyntheticConfig(shape=(64, 64), diameter=20), seed=1)
    monkeypatch.setattr(flows_mod, "MIN_FILES_PER_WORKER", 2)  # force the 2-process path
    assert fill_flow_cache(tmp_path, workers=2, progress=False) == 4
    ds = CanonicalDataset(tmp_path)
    for i in range(4):
        np.testing.assert_array_equal(ds.flows(i), masks_to_flows(ds.mask(i)))
