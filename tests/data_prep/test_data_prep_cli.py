"""`cpsam prep` through the real CLI dispatcher (no network: download is only tried on gated sources)."""

from __future__ import annotations

import numpy as np
import tifffile

from cpsam.cli import main
from data_prep.canonical import CanonicalDataset


def test_list_all_and_one(capsys):
    assert main(["prep", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("tissuenet", "livecell", "pannuke", "bbbc039", "ctc", "seg_npy"):
        assert name in out
    assert "CC BY-NC-SA 4.0" in out and "by hand" in out
    assert main(["prep", "list", "tissuenet"]) == 0
    out = capsys.readouterr().out
    assert "datasets.deepcell.org" in out and "X[...,0] nucleus" in out


def test_download_gated_source_prints_instructions(tmp_path, capsys):
    assert main(["prep", "download", "tissuenet", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "DeepCell account" in out and "cpsam prep convert tissuenet --raw RAW --out OUT" in out
    assert list(tmp_path.iterdir()) == []
    assert main(["prep", "download", "nosuchset", "--out", str(tmp_path)]) == 1
    assert "unknown dataset 'nosuchset'" in capsys.readouterr().err


def test_convert_synth_subimages_export(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    lab = np.zeros((64, 64), np.uint16)
    lab[5:20, 5:20] = 4
    lab[30:60, 30:60] = 8
    for k in range(3):
        tifffile.imwrite(raw / f"x{k}.tif", np.full((64, 64), k, np.uint8))
        tifffile.imwrite(raw / f"x{k}_masks.tif", lab)
    out = tmp_path / "canon"
    assert (
        main(
            [
                "prep",
                "convert",
                "folder",
                "--raw",
                str(raw),
                "--out",
                str(out),
                "--workers",
                "2",
                "--split",
                "val",
            ]
        )
        == 0
    )
    assert "3 written, 0 already done, 0 failed of 3" in capsys.readouterr().out
    assert main(["prep", "convert", "folder", "--raw", str(raw), "--out", str(out)]) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out
    ds = CanonicalDataset(out, split="val")
    assert len(ds) == 3 and ds[0].n_objects == 2
    assert (
        main(
            [
                "prep",
                "synth",
                str(tmp_path / "syn"),
                "--n",
                "2",
                "--size",
                "96",
                "--diameter",
                "24",
                "--modality",
                "phase",
            ]
        )
        == 0
    )
    assert len(CanonicalDataset(tmp_path / "syn")) == 2
    assert main(["prep", "subimages", str(out), "--out", str(tmp_path / "tiles"), "--size", "32"]) == 0
    tiles = CanonicalDataset(tmp_path / "tiles")
    assert len(tiles) == 3 * 4  # the large cell reaches into all four 32x32 tiles of every image
    # the 2x2-px corner of the large cell in the first tile is under min_size (10 px) and dropped
    assert [r.n_objects for r in tiles] == [1] * 12
    capsys.readouterr()
    assert main(["prep", "info", str(out), str(tmp_path / "syn")]) == 0
    info = capsys.readouterr().out
    assert "folder           val          3         6" in info and "synthetic_phase  train        2" in info
    assert "5 images, flow cache 0/5" in info
    assert main(["prep", "export", str(out), "--out", str(tmp_path / "pairs")]) == 0
    assert len(list((tmp_path / "pairs").glob("*_masks.tif"))) == 3


def test_convert_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["prep", "convert", "bbbc039", "--raw", str(missing), "--out", str(tmp_path / "o")]) == 1
    assert f"{missing}: raw folder does not exist" in capsys.readouterr().err
    (tmp_path / "raw").mkdir()
    assert (
        main(["prep", "convert", "bbbc039", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "metadata/training.txt: split list is missing" in capsys.readouterr().err


def test_download_extract_convert_end_to_end(tmp_path, monkeypatch, capsys):
    import hashlib

    from test_data_prep_download import _fixture_zip, _Server

    from data_prep import sources
    from data_prep.sources.base import Download
    from data_prep.sources.folder import Folder

    payload = _fixture_zip()
    with _Server(payload) as srv:

        class Local(Folder):
            name = "local_fixture"
            manual = ""
            downloads = (Download(srv.url, "fixture.zip", hashlib.sha256(payload).hexdigest()),)

        monkeypatch.setitem(sources.SOURCES, "local_fixture", Local)
        srv.cut_after = [len(payload) // 2]  # first transfer breaks; the built-in retry resumes it
        assert main(["prep", "download", "local_fixture", "--out", str(tmp_path / "dl")]) == 0
        assert srv.requests == [None, f"bytes={len(payload) // 2}-"]
    assert "cpsam prep convert local_fixture" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "dl" / "set").iterdir()) == [
        "im0_img.tif",
        "im1_img.tif",
        "im2_img.tif",
    ]


def test_timelapse_cli(tmp_path, capsys):
    stack = np.random.default_rng(0).integers(0, 255, (8, 120, 120), dtype=np.uint8)
    masks = np.zeros((8, 120, 120), np.uint16)
    masks[:, 10:110, 10:110] = 1
    tifffile.imwrite(tmp_path / "s.tif", stack)
    tifffile.imwrite(tmp_path / "s_masks.tif", masks)
    args = ["prep", "timelapse", str(tmp_path / "s.tif"), "--masks", str(tmp_path / "s_masks.tif")]
    assert main([*args, "--out", str(tmp_path / "crops"), "--frames", "3", "--crop", "64"]) == 0
    ds = CanonicalDataset(tmp_path / "crops")
    assert len(ds) == 3 and all(r.height == r.width == 68 and r.n_objects == 1 for r in ds)
