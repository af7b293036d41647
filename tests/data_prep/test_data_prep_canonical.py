"""Canonical format on real data: raw-sample converters, folder round trip, MANIFEST diameters,
idempotent/resumable/parallel conversion, the reader."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
from conftest import shared_path

from cpsam.io import InputFileError
from data_prep import convert as convert_mod
from data_prep.canonical import CanonicalDataset, export_pairs, read_index
from data_prep.convert import convert
from data_prep.labels import relabel_consecutive
from data_prep.sources import get_source


def test_neurips22_raw_label_tiff(tmp_path):
    raw = shared_path("data", "raw-samples", "neurips22")
    rep = convert(get_source("neurips22"), raw, tmp_path, progress=False)
    assert rep.written == 1 and not rep.failed
    ds = CanonicalDataset(tmp_path)
    row = ds[0]
    assert (row.dataset, row.split, row.n_objects, row.height, row.width) == (
        "neurips22",
        "train",
        44,
        200,
        200,
    )
    src = tifffile.imread(raw / "Train_Labeled/labels/cell_00528_label.tiff")
    mask = ds.mask(0)
    assert mask.dtype == np.uint16 and mask.max() == 44
    np.testing.assert_array_equal(mask, relabel_consecutive(src))
    np.testing.assert_array_equal(ds.image(0), tifffile.imread(raw / "Train_Labeled/images/cell_00528.tif"))


def test_monuseg_raw_xml_first_region_kept(tmp_path):
    raw = shared_path("data", "raw-samples", "monuseg")
    xml = raw / "MoNuSegTestData/TCGA-2Z-A9J9-01A-01-TS1.xml"
    regions = list(ET.parse(xml).getroot().iter("Region"))
    convert(get_source("monuseg"), raw, tmp_path, progress=False)
    ds = CanonicalDataset(tmp_path, split="test")
    assert len(ds) == 1 and ds[0].dataset == "monuseg" and ds.image(0).shape == (3, 1000, 1000)
    mask = ds.mask(0)
    assert ds[0].n_objects == len(regions) == 575  # one instance per Region, none lost
    # the first Region (the one a 0-based rasteriser paints as background) is object 1
    v = np.array([[float(p.get("X")), float(p.get("Y"))] for p in regions[0].iter("Vertex")])
    cy, cx = int(round(v[:, 1].mean())), int(round(v[:, 0].mean()))
    assert mask[cy, cx] == 1
    assert 300 < (mask == 1).sum() < 900  # the XML states Area="619.5"


def _manifest_total() -> int:
    """The image count MANIFEST.md states ("Totals: **N images, ..."), so the test follows the shared set."""
    text = shared_path("data", "MANIFEST.md").read_text()
    return int(re.search(r"Totals: \*\*(\d+) images", text).group(1))


def _folder_raw(tmp_path, manifest):
    """A plain folder of the manifest's pairs built from ../shared/data (symlinks, nothing copied into the repo)."""
    data = shared_path("data")
    raw = tmp_path / "raw"
    for rec in manifest:
        for key in ("image", "mask"):
            dst = raw / rec[key]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(data / rec[key])
    return raw, manifest


def test_shared_data_round_trip_and_manifest_diameters(tmp_path, shared_manifest):
    raw, manifest = _folder_raw(tmp_path, shared_manifest)
    out = tmp_path / "canonical"
    rep = convert(get_source("folder"), raw, out, workers=2, progress=False)
    assert len(manifest) == _manifest_total() and rep.written == len(manifest) and not rep.failed
    rows = {r.name: r for r in read_index(out)}
    for rec in manifest:
        row = rows[f"folder_{rec['folder']}_{rec['name']}"]
        assert row.n_objects == rec["n_objects"]
        assert abs(row.median_diameter - rec["median_equiv_diameter_px"]) <= 1.0, rec["name"]
    back = tmp_path / "back"
    assert export_pairs(out, back) == len(manifest)
    for rec in manifest:
        name = f"folder_{rec['folder']}_{rec['name']}"
        np.testing.assert_array_equal(
            tifffile.imread(back / f"{name}_masks.tif"), tifffile.imread(shared_path("data", rec["mask"]))
        )
        img = tifffile.imread(shared_path("data", rec["image"]))
        assert list(img.shape) == rec["image_shape"], rec["name"]
        # MANIFEST.md: 3-D images are YXS (RGB) unless the record's `axes` says CYX; canonical images are CYX
        if img.ndim == 3 and rec.get("axes", "YXS") == "YXS":
            img = np.moveaxis(img, -1, 0)
        np.testing.assert_array_equal(tifffile.imread(back / f"{name}_img.tif"), img)


def test_folder_round_trip_subset_fast(tmp_path, shared_manifest):
    raw, manifest = _folder_raw(tmp_path, shared_manifest)
    small = [r for r in manifest if r["folder"] in ("phase_ctc_U373", "bact_phase_neurips22")]
    out = tmp_path / "canonical"
    convert(get_source("folder"), raw / "phase_ctc_U373", out, progress=False)
    convert(get_source("folder", split="test"), raw / "bact_phase_neurips22", out, progress=False)
    ds = CanonicalDataset(out)
    assert len(ds) == len(small) == 5
    assert {r.split for r in ds} == {"train", "test"} and len(CanonicalDataset(out, split="test")) == 1
    by_name = {r["name"]: r for r in small}
    for i, row in enumerate(ds):
        rec = next(r for r in by_name.values() if row.name.endswith(r["name"]))
        assert abs(row.median_diameter - rec["median_equiv_diameter_px"]) <= 1.0
        np.testing.assert_array_equal(ds.mask(i), tifffile.imread(shared_path("data", rec["mask"])))


def _tiny_folder(tmp_path, n=6):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        lab = np.zeros((32, 32), np.uint16)
        lab[2:10, 2:10] = 5
        lab[12:20, 12:30] = 9
        tifffile.imwrite(raw / f"im{k}_img.tif", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        tifffile.imwrite(raw / f"im{k}_masks.tif", lab)
    return raw


def test_convert_idempotent_resumable_parallel(tmp_path, monkeypatch):
    raw, out = _tiny_folder(tmp_path), tmp_path / "out"
    src = get_source("folder")
    real = convert_mod._convert_one
    calls = {"n": 0}

    def flaky(source, raw_, out_, item):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the 4th example
        return real(source, raw_, out_, item)

    monkeypatch.setattr(convert_mod, "_convert_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, raw, out, progress=False)
    assert len(list((out / "masks").glob("*.tif"))) == 3
    assert len(read_index(out)) == 3  # the index is flushed even on interruption
    assert not [p for p in out.rglob("*") if ".part" in p.name]  # nothing half-written
    monkeypatch.setattr(convert_mod, "_convert_one", real)
    rep = convert(src, raw, out, workers=2, progress=False)
    assert (rep.skipped, rep.written) == (3, 3)
    rep = convert(src, raw, out, progress=False)
    assert (rep.skipped, rep.written) == (6, 0)
    ds = CanonicalDataset(out)
    assert len(ds) == 6 and all(r.n_objects == 2 for r in ds)
    assert ds.mask(0).max() == 2 and ds.flows(0) is None


def test_bad_input_names_the_file(tmp_path):
    raw = _tiny_folder(tmp_path, n=2)
    (raw / "im1_masks.tif").write_bytes(b"not a tiff")
    rep = convert(get_source("folder"), raw, tmp_path / "out", progress=False)
    assert rep.written == 1 and "im1_masks.tif" in rep.failed["im1"]
    (raw / "orphan_masks.tif").write_bytes(b"x")  # listed and counted; the others still convert
    rep = convert(get_source("folder"), raw, tmp_path / "out2", progress=False)
    assert rep.written == 1 and len(rep.failed) == 2
    assert f"{raw / 'orphan_masks.tif'}: mask without an image beside it" in rep.failed["orphan_masks.tif#unpaired"]
    with pytest.raises(InputFileError, match="index.csv missing"):
        CanonicalDataset(tmp_path / "nothing")
