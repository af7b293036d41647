"""Every converter on a tiny fixture built in its documented raw layout (datasets.md), with the
pitfalls of each source checked on the converted canonical output."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import tifffile

from data_prep.canonical import CanonicalDataset
from data_prep.convert import convert
from data_prep.sources import SOURCES, LayoutError, get_source

RNG = np.random.default_rng(0)


def _png(path: Path, array: np.ndarray) -> None:
    """Write a PNG; colour arrays are given RGB(A) and stored as such."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = array[..., [2, 1, 0, 3]] if array.shape[-1] == 4 else array[..., ::-1]
    assert cv2.imwrite(str(path), np.ascontiguousarray(array))


def _tif(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array)


def _blobs(h=40, w=48, boxes=((2, 2, 12, 14), (14, 20, 26, 34), (28, 4, 38, 16))) -> np.ndarray:
    lab = np.zeros((h, w), np.int32)
    for k, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        lab[y0:y1, x0:x1] = k
    return lab


def _run(name, raw, out, **kw) -> CanonicalDataset:
    rep = convert(get_source(name, **kw), raw, out, progress=False)
    assert not rep.failed, rep.failed
    return CanonicalDataset(out)


def test_registry_lists_every_issue_source():
    expected = {
        "cyto2",
        "nuclei",
        "tissuenet",
        "livecell",
        "omnipose",
        "yeaz",
        "deepbacs",
        "neurips22",
        "monuseg",
        "monusac",
        "cryonuseg",
        "nuinsseg",
        "bccd",
        "cpm15",
        "cpm17",
        "tnbc",
        "lynsec",
        "ihc_tma",
        "conic",
        "pannuke",
        "ctc",
        "bbbc038",
        "bbbc039",
        "folder",
        "seg_npy",
    }
    assert expected == set(SOURCES)
    for name, cls in SOURCES.items():
        src = cls()
        assert src.layout.strip() and src.license and (src.manual or src.downloads), name
        assert name in src.describe()


def test_cyto2_splits_and_16bit_masks(tmp_path):
    raw = tmp_path / "raw"
    lab = _blobs()
    lab[lab == 3] = 300  # ids above 255: the PNG must be read as 16 bit
    for folder in ("train", "train_cyto2", "test"):
        _png(raw / folder / "000_img.png", RNG.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        _png(raw / folder / "000_masks.png", lab.astype(np.uint16))
    ds = _run("cyto2", raw, tmp_path / "out")
    assert sorted((r.name, r.split) for r in ds) == [
        ("cyto2_test_000", "test"),
        ("cyto2_train_000", "train"),
        ("cyto2_train_cyto2_000", "train"),
    ]
    assert all(r.n_objects == 3 and r.channels == 3 for r in ds)
    assert ds.mask(0).max() == 3


def test_tissuenet_channel_order_and_whole_cell_labels(tmp_path):
    n, h, w = 3, 32, 32
    X = RNG.random((n, h, w, 2)).astype(np.float32)
    X[..., 0] += 10  # nuclear channel recognisable by its offset
    y = np.zeros((n, h, w, 2), np.int32)
    y[:, 4:20, 4:20, 0] = 1  # whole cell (large)
    y[:, 22:30, 22:30, 0] = 2
    y[:, 8:12, 8:12, 1] = 1  # nucleus (small)
    meta = np.array([["filename", "tissue"], ["a", "breast"]], dtype=object)
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "val", "test"):
        np.savez_compressed(raw / f"tissuenet_v1.1_{split}.npz", X=X, y=y, meta=meta)
    ds = _run(
        "tissuenet",
        raw,
        tmp_path / "out",
    )
    assert len(ds) == 9 and {r.split for r in ds} == {"train", "val", "test"}
    i = ds.names.index("tissuenet_val_00001")
    img = ds.image(i)
    assert img.shape == (2, h, w) and img.dtype == np.float32
    np.testing.assert_array_equal(img[0], X[1, ..., 1])  # membrane / cytoplasm first
    np.testing.assert_array_equal(img[1], X[1, ..., 0])  # nucleus second
    assert ds[i].n_objects == 2 and (ds.mask(i) > 0).sum() == 16 * 16 + 8 * 8  # whole-cell labels y[..., 0]


def test_livecell_overlapping_polygons(tmp_path):
    raw = tmp_path / "raw"
    img_dir = raw / "images" / "livecell_train_val_images" / "A172"
    _tif(img_dir / "A172_Phase_A7_1_00d00h00m_1.tif", RNG.integers(0, 255, (50, 60), dtype=np.uint8))
    _tif(
        raw / "images" / "livecell_test_images" / "A172" / "A172_Phase_B7_1_00d00h00m_1.tif",
        np.zeros((50, 60), np.uint8),
    )
    square = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    anns = [
        {"id": 1, "image_id": 7, "segmentation": square(5, 5, 24, 24)},
        {"id": 2, "image_id": 7, "segmentation": square(15, 5, 34, 24)},  # overlaps #1 in x 15..24
        {
            "id": 3,
            "image_id": 7,
            "segmentation": square(6, 6, 9, 9),
        },  # inside #1: >= 75 % overlapped, dropped
        {
            "id": 4,
            "image_id": 7,
            "segmentation": {"size": [50, 60], "counts": [40 * 50 + 5, 10, 40, 10]},
        },  # RLE
    ]
    coco = {
        "images": [{"id": 7, "file_name": "A172_Phase_A7_1_00d00h00m_1.tif", "width": 60, "height": 50}],
        "annotations": anns,
    }
    (raw / "livecell_coco_train.json").write_text(json.dumps(coco))
    coco_test = {"images": [{"id": 1, "file_name": "A172_Phase_B7_1_00d00h00m_1.tif"}], "annotations": []}
    (raw / "livecell_coco_test.json").write_text(json.dumps(coco_test))
    ds = _run("livecell", raw, tmp_path / "out")
    i = ds.names.index("livecell_train_A172_Phase_A7_1_00d00h00m_1")
    m = ds.mask(i)
    assert ds[i].n_objects == 3 and ds[ds.names.index("livecell_test_A172_Phase_B7_1_00d00h00m_1")].n_objects == 0
    assert m[15, 17] == m[10, 10] and m[15, 22] == m[15, 30] and m[15, 17] != m[15, 22]  # nearest centroid
    assert m[7, 7] == m[10, 10]  # the dropped inner object left its pixels to #1
    # RLE object: column-major runs -> rows 5..14 of columns 40 and 41
    assert m[5, 40] > 0 and m[14, 41] == m[5, 40] and m[4, 40] == 0 and m[5, 42] == 0


def test_omnipose_excludes_flows_and_splits_ncolor(tmp_path):
    raw = tmp_path / "raw" / "data"
    lab = _blobs()
    ncolor = np.where(lab == 3, 1, lab)  # ids reused: object 3 painted with colour 1
    for split, masks in (("train_sorted", lab), ("test_sorted", ncolor)):
        d = raw / "bact_phase" / split / "ecoli"
        _tif(d / "a.tif", RNG.integers(0, 2**16, (40, 48), dtype=np.uint16))
        _tif(d / "a_masks.tif", masks.astype(np.uint16))
        tifffile.imwrite(d / "a_flows.tif", np.zeros((3, 40, 48), np.float32), photometric="minisblack")
    ds = _run("omnipose", raw.parent, tmp_path / "out")
    assert len(ds) == 2 and {r.split: r.n_objects for r in ds} == {"train": 3, "test": 3}


def test_yeaz_and_deepbacs_pairs(tmp_path):
    raw = tmp_path / "yeaz"
    for k in range(4):
        _tif(raw / "gold-standard-PhC-plus-2" / f"mov1_{k}_im.tif", np.ones((40, 48), np.uint16))
        _tif(raw / "gold-standard-PhC-plus-2" / f"mov1_{k}_mask.tif", _blobs().astype(np.uint16))
    ds = _run("yeaz", raw, tmp_path / "out_yeaz")
    assert len(ds) == 4 and len({r.split for r in ds}) == 1  # frames of one movie share a split
    raw = tmp_path / "deepbacs" / "DeepBacs_MIXED"
    for split in ("training", "test"):
        _tif(raw / split / "source" / "JE2_1.tif", np.ones((40, 48), np.uint8))
        _tif(raw / split / "target" / "JE2_1.tif", _blobs().astype(np.uint16))
    ds = _run("deepbacs", raw.parent, tmp_path / "out_db")
    assert sorted(r.split for r in ds) == ["test", "train"] and all(r.n_objects == 3 for r in ds)


def _aperio(path: Path, groups: dict[str, list[list[tuple[float, float]]]]) -> None:
    anns = []
    for k, (group, polys) in enumerate(groups.items(), start=1):
        regs = "".join(
            f'<Region Id="{i}"><Vertices>'
            + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in p)
            + "</Vertices></Region>"
            for i, p in enumerate(polys, start=1)
        )
        anns.append(
            f'<Annotation Id="{k}"><Attributes><Attribute Name="{group}" Id="0" Value=""/></Attributes>'
            f"<Regions>{regs}</Regions></Annotation>"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<Annotations>{''.join(anns)}</Annotations>")


def test_monusac_classes_merged_ambiguous_ignored(tmp_path):
    raw = tmp_path / "raw"
    sq = lambda x0, y0, s: [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]  # noqa: E731
    for top in ("MoNuSAC_images_and_annotations", "MoNuSAC Testing Data and Annotations"):
        d = raw / top / "TCGA-55-1594"
        _tif(d / "TCGA-55-1594-01Z-00-DX1_1.tif", RNG.integers(0, 255, (40, 40, 4), dtype=np.uint8))
        _aperio(
            d / "TCGA-55-1594-01Z-00-DX1_1.xml",
            {
                "Epithelial": [sq(2, 2, 8), [(1, 1), (3, 3)]],  # the 2-vertex region is skipped
                "Lymphocyte": [sq(20, 2, 6), sq(20, 20, 6)],
                "Ambiguous": [sq(2, 25, 10)],
            },
        )
    ds = _run("monusac", raw, tmp_path / "out")
    assert sorted(r.split for r in ds) == ["test", "train"]
    assert all(r.n_objects == 3 and r.channels == 3 for r in ds)  # alpha dropped
    ign = ds.ignore(0)
    assert ign is not None and ign[30, 6] and not ign[5, 5] and ds.mask(0)[30, 6] == 0


def test_cryonuseg_and_nuinsseg_use_label_masks_modify(tmp_path):
    lab = _blobs()
    raw = tmp_path / "cryo"
    _tif(raw / "tissue images" / "TCGA-XX-A1-01Z.tif", RNG.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    _tif(raw / "Annotator 1 (biologist)" / "label masks modify" / "TCGA-XX-A1-01Z.tif", lab.astype(np.uint16))
    summed = lab.copy()
    summed[10:12, 10:14] = 4  # an overlap in the SUM image: a fake object
    _tif(raw / "Annotator 1 (biologist)" / "label masks" / "TCGA-XX-A1-01Z.tif", summed.astype(np.uint16))
    ds = _run("cryonuseg", raw, tmp_path / "out_cryo")
    assert len(ds) == 1 and ds[0].n_objects == 3
    raw = tmp_path / "nuins"
    for organ in ("human kidney", "mouse liver"):
        _png(
            raw / organ / "tissue images" / f"{organ[:5]}_1.png",
            RNG.integers(0, 255, (40, 48, 4), dtype=np.uint8),
        )
        _tif(raw / organ / "label masks modify" / f"{organ[:5]}_1.tif", lab.astype(np.uint16))
    ds = _run("nuinsseg", raw, tmp_path / "out_nuins")
    assert len(ds) == 2 and all(r.n_objects == 3 and r.channels == 3 for r in ds)


def test_bccd_noisy_semantic_masks(tmp_path):
    raw = tmp_path / "raw" / "BCCD Dataset with mask"
    fg = (_blobs() > 0).astype(np.uint8) * 255
    fg[0, :] = 40  # JPEG-like noise below the threshold
    fg[30:32, 40:42] = 255  # a 4-px speck, removed as too small
    for split in ("train", "test"):
        _png(raw / split / "original" / "b1.png", RNG.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        _png(raw / split / "mask" / "b1.png", np.stack([fg] * 3, -1))
    ds = _run("bccd", raw.parent, tmp_path / "out")
    assert sorted(r.split for r in ds) == ["test", "train"] and all(r.n_objects == 3 for r in ds)


def test_cpm15_text_and_cpm17_mat(tmp_path):
    lab = _blobs(h=30, w=50)  # non-square: catches a transposed reader
    raw = tmp_path / "cpm15"
    _png(raw / "image01.png", RNG.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    (raw / "image01_mask.txt").write_text("50 30\n" + "\n".join(map(str, lab.ravel())) + "\n")
    _png(raw / "image01_poly.png", np.zeros((30, 50, 3), np.uint8))  # overlay only, not an image
    ds = _run("cpm15", raw, tmp_path / "out15")
    assert len(ds) == 1 and ds[0].n_objects == 3
    np.testing.assert_array_equal(ds.mask(0), lab)
    raw = tmp_path / "cpm17"
    for split in ("train", "test"):
        _png(raw / "cpm17" / split / "Images" / "image_00.png", np.zeros((30, 50, 3), np.uint8))
        (raw / "cpm17" / split / "Labels").mkdir(parents=True)
        scipy.io.savemat(raw / "cpm17" / split / "Labels" / "image_00.mat", {"inst_map": lab.astype(np.float64)})
    ds = _run("cpm17", raw, tmp_path / "out17")
    assert sorted(r.split for r in ds) == ["test", "train"]
    np.testing.assert_array_equal(ds.mask(0), lab)
    (raw / "cpm17" / "test" / "Labels" / "image_00.mat").unlink()
    with pytest.raises(LayoutError, match="image_00.mat"):
        convert(get_source("cpm17"), raw, tmp_path / "out17b", progress=False)


def test_tnbc_binary_gt_and_alpha(tmp_path):
    raw = tmp_path / "raw" / "TNBC_NucleiSegmentation"
    _png(raw / "Slide_01" / "01_1.png", RNG.integers(0, 255, (40, 48, 4), dtype=np.uint8))
    _png(raw / "GT_01" / "01_1.png", ((_blobs() > 0) * 255).astype(np.uint8))
    (raw / "__MACOSX").mkdir()
    ds = _run("tnbc", raw.parent, tmp_path / "out")
    assert len(ds) == 1 and ds[0].channels == 3 and ds[0].n_objects == 3


def test_lynsec_npy_and_bad_folder_2(tmp_path):
    raw = tmp_path / "raw"
    arr = np.concatenate([RNG.random((40, 48, 3)) * 255, _blobs()[..., None]], -1)
    for folder, stem in (("lynsec 1", "0_l1"), ("lynsec 2", "3_l2"), ("lynsec 2", "40_l2")):
        (raw / folder).mkdir(parents=True, exist_ok=True)
        np.save(raw / folder / f"{stem}.npy", arr)
    ds = _run("lynsec", raw, tmp_path / "out")
    assert sorted(ds.names) == ["lynsec_0_l1", "lynsec_40_l2"]  # 0_l2..34_l2 have mismatching labels
    assert ds.image(0).dtype == np.uint8 and ds[0].n_objects == 3


def test_ihc_tma_channels_offset_and_folds(tmp_path):
    raw = tmp_path / "raw" / "IHC_TMA_dataset"
    m = np.zeros((3, 32, 32), np.int32)
    m[0, 2:8, 2:8] = 1  # negative nucleus id 1
    m[1, 20:26, 20:26] = 1  # positive nucleus, ALSO id 1
    m[1, 2:6, 20:26] = 2
    m[2] = (m[0] + m[1]) == 0  # inverted foreground: never labels
    for fold in (1, 2, 3):
        _png(raw / "images" / f"fold{fold}_1_CD3.png", np.zeros((32, 32, 3), np.uint8))
        (raw / "masks").mkdir(parents=True, exist_ok=True)
        np.save(raw / "masks" / f"fold{fold}_1_CD3.npy", m)
    ds = _run("ihc_tma", raw.parent, tmp_path / "out")
    assert {r.name.split("_")[2]: r.split for r in ds} == {"fold1": "train", "fold2": "val", "fold3": "test"}
    assert all(r.n_objects == 3 for r in ds)


def test_conic_instance_channel_and_source_split(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    n = 4
    np.save(raw / "images.npy", RNG.integers(0, 255, (n, 40, 48, 3), dtype=np.uint8))
    labels = np.zeros((n, 40, 48, 2), np.uint16)
    labels[..., 0] = _blobs()
    labels[..., 1] = 5 * (_blobs() > 0)  # class map: must not be read as instances
    np.save(raw / "labels.npy", labels)
    (raw / "patch_info.csv").write_text(
        "patch_info\n" + "\n".join(["consep_1-0000", "consep_1-0001", "crag_2-0000", "crag_2-0001"]) + "\n"
    )
    ds = _run("conic", raw, tmp_path / "out")
    assert len(ds) == 4 and all(r.n_objects == 3 for r in ds)
    splits = {r.name: r.split for r in ds}
    assert splits["conic_00000"] == splits["conic_00001"] and splits["conic_00002"] == splits["conic_00003"]


def test_pannuke_background_is_last_channel(tmp_path):
    raw = tmp_path / "raw"
    n = 2
    masks = np.zeros((n, 32, 32, 6), np.float64)
    masks[:, 2:8, 2:8, 0] = 7  # neoplastic id 7
    masks[:, 20:26, 20:26, 1] = 7  # inflammatory, same id 7: must stay a separate object
    masks[:, 10:14, 2:8, 4] = 3
    masks[..., 5] = masks[..., :5].sum(-1) == 0  # background channel, LAST
    for k in (1, 2, 3):
        d = raw / f"Fold {k}"
        (d / "images" / f"fold{k}").mkdir(parents=True)
        (d / "masks" / f"fold{k}").mkdir(parents=True)
        np.save(d / "images" / f"fold{k}" / "images.npy", RNG.random((n, 32, 32, 3)) * 255)
        np.save(d / "masks" / f"fold{k}" / "masks.npy", masks)
    ds = _run("pannuke", raw, tmp_path / "out")
    assert len(ds) == 6 and {r.split for r in ds} == {"train", "val", "test"}
    assert all(r.n_objects == 3 for r in ds)  # the background channel is not an object
    assert ds.image(0).dtype == np.uint8 and (ds.mask(0) > 0).sum() == 36 + 36 + 24


def test_ctc_seg_frames(tmp_path):
    raw = tmp_path / "raw" / "Fluo-N2DL-HeLa"
    for seq in ("01", "02"):
        for t in ("013", "052"):
            _tif(raw / seq / f"t{t}.tif", np.ones((40, 48), np.uint16))
            _tif(raw / f"{seq}_GT" / "SEG" / f"man_seg{t}.tif", _blobs().astype(np.uint16))
    _tif(raw / "01_GT" / "SEG" / "man_seg_013_005.tif", _blobs().astype(np.uint16))  # 3-D slice: skipped
    _tif(raw / "01" / "t014.tif", np.ones((40, 48), np.uint16))  # frame without SEG: skipped
    ds = _run("ctc", raw.parent, tmp_path / "out")
    assert sorted(ds.names) == [f"ctc_Fluo-N2DL-HeLa_{s}_t{t}" for s in ("01", "02") for t in ("013", "052")]
    assert all(ds.ignore(i) is None for i in range(len(ds)))  # no TRA files: no ignore mask
    tra = _blobs()
    tra[30:34, 40:44] = 9  # a cell the partial SEG frame left out (its marker touches no SEG object)
    _tif(raw / "01_GT" / "TRA" / "man_track013.tif", tra.astype(np.uint16))
    ds = _run("ctc", raw.parent, tmp_path / "out_tra")
    i = ds.names.index("ctc_Fluo-N2DL-HeLa_01_t013")
    ign = ds.ignore(i)
    assert ign is not None and ign[32, 42] and ign[28, 42] and not ign[20, 42] and not (ign & (ds.mask(i) > 0)).any()
    (raw / "02" / "t052.tif").unlink()
    with pytest.raises(LayoutError, match="t052.tif"):
        convert(get_source("ctc"), raw.parent, tmp_path / "out2", progress=False)


def test_bbbc038_one_png_per_object(tmp_path):
    raw = tmp_path / "raw" / "stage1_train"
    case = raw / "abc123"
    grey = RNG.integers(0, 255, (40, 48), dtype=np.uint8)
    _png(case / "images" / "abc123.png", np.stack([grey, grey, grey, np.full_like(grey, 255)], -1))
    lab = _blobs()
    for k in (1, 2, 3):
        _png(case / "masks" / f"m{k}.png", ((lab == k) * 255).astype(np.uint8))
    ds = _run("bbbc038", raw.parent, tmp_path / "out")
    assert ds[0].n_objects == 3 and ds[0].channels == 1  # RGBA grey -> one channel
    np.testing.assert_array_equal(ds.image(0), grey)
    np.testing.assert_array_equal(ds.mask(0) > 0, lab > 0)


def test_bbbc039_graph_colouring_split(tmp_path):
    raw = tmp_path / "raw"
    colour = np.zeros((40, 48), np.uint8)
    colour[2:10, 2:10] = 1
    colour[2:10, 10:18] = 2  # touches the colour-1 nucleus
    colour[20:30, 2:10] = 1  # another nucleus with colour 1
    colour[20:30, 30:40] = 3
    rgba = np.stack([colour, 0 * colour, 0 * colour, np.full_like(colour, 255)], -1)
    names = {"training.txt": "f1", "validation.txt": "f2", "test.txt": "f3"}
    (raw / "metadata").mkdir(parents=True)
    for fname, stem in names.items():
        _tif(raw / "images" / f"{stem}.tif", RNG.integers(120, 4095, (40, 48), dtype=np.uint16))
        _png(raw / "masks" / f"{stem}.png", rgba)
        (raw / "metadata" / fname).write_text(f"{stem}.png\n")
    ds = _run("bbbc039", raw, tmp_path / "out")
    assert {r.name: r.split for r in ds} == {"bbbc039_f1": "train", "bbbc039_f2": "val", "bbbc039_f3": "test"}
    assert all(r.n_objects == 4 for r in ds)  # reading the red channel as ids would give 3


def test_seg_npy(tmp_path):
    raw = tmp_path / "raw"
    (raw / "test").mkdir(parents=True)
    img = RNG.integers(0, 255, (40, 48), dtype=np.uint8)
    _png(raw / "a.png", img)
    np.save(raw / "a_seg.npy", {"masks": _blobs().astype(np.uint16), "outlines": None, "filename": "a.png"})
    np.save(raw / "test" / "b_seg.npy", {"masks": _blobs().astype(np.uint16), "img": img})
    ds = _run("seg_npy", raw, tmp_path / "out")
    assert {r.name: r.split for r in ds} == {"seg_npy_a": "train", "seg_npy_test_b": "test"}
    np.testing.assert_array_equal(ds.image(0), img)
    np.save(raw / "c_seg.npy", {"masks": _blobs()})
    rep = convert(get_source("seg_npy"), raw, tmp_path / "out", progress=False)
    assert "image missing" in rep.failed["c"]


def test_missing_layout_names_the_file(tmp_path):
    raw = tmp_path / "raw" / "MoNuSegTestData"
    _tif(raw / "TCGA-1.tif", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(LayoutError, match="TCGA-1.xml"):
        convert(get_source("monuseg"), raw.parent, tmp_path / "out", progress=False)
    with pytest.raises(LayoutError, match="tissuenet_v1.1_train.npz"):
        convert(get_source("tissuenet"), raw.parent, tmp_path / "out", progress=False)


def test_folder_layouts_and_split_folders(tmp_path):
    raw = tmp_path / "raw"
    lab = _blobs().astype(np.uint16)
    for split in ("train", "test"):  # images/ + masks/ sub-folders, split from the folder name
        _png(raw / split / "images" / "a.png", np.zeros((40, 48), np.uint8))
        _tif(raw / split / "masks" / "a.tif", lab)
    _tif(raw / "val" / "b.tif", np.zeros((40, 48), np.uint8))  # Cellpose NAME + NAME_masks convention
    _tif(raw / "val" / "b_masks.tif", lab)
    _tif(raw / "val" / "b_flows.tif", np.zeros((40, 48), np.float32))  # Cellpose flow files are not images
    ds = _run("folder", raw, tmp_path / "out")
    assert {r.name: r.split for r in ds} == {
        "folder_train_a": "train",
        "folder_test_a": "test",
        "folder_val_b": "val",
    }
    assert all(r.n_objects == 3 for r in ds)


def test_seg_npy_written_by_cellpose_and_by_cpsam(tmp_path):
    from cellpose.io import masks_flows_to_seg

    from cpsam.io import seg_npy_dict, write_seg_npy

    raw = tmp_path / "raw"
    raw.mkdir()
    lab = _blobs().astype(np.uint16)
    img = RNG.integers(0, 2**12, (40, 48), dtype=np.uint16)
    dP, cellprob = np.zeros((2, 40, 48), np.float32), np.zeros((40, 48), np.float32)
    _tif(raw / "by_cellpose.tif", img)
    masks_flows_to_seg(img, lab, [np.zeros((40, 48, 3), np.uint8), dP, cellprob], str(raw / "by_cellpose.tif"))
    _tif(raw / "by_cpsam.tif", img)
    write_seg_npy(raw / "by_cpsam_seg.npy", seg_npy_dict(lab, dP, cellprob, raw / "by_cpsam.tif"))
    ds = _run("seg_npy", raw, tmp_path / "out")
    assert sorted(ds.names) == ["seg_npy_by_cellpose", "seg_npy_by_cpsam"]
    for i in range(2):
        np.testing.assert_array_equal(ds.mask(i), lab)
        np.testing.assert_array_equal(ds.image(i), img)
