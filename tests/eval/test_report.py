"""eval.pairing (name rule), eval.report (averaging, tables, atomic files) and cpsam.report.plots (real PNGs)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cpsam.io import read_image, write_labels
from cpsam.metrics import score_image
from cpsam.report.plots import SpeedPoint, accuracy_speed_scatter, error_rate_bars
from eval.pairing import find_label_files, pair_files, split_key
from eval.report import (
    markdown_table,
    report_markdown,
    score_pairs,
    summary_rows,
    write_report,
)


def blobs(n: int, seed: int, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    """n non-overlapping 4x4 squares at random grid cells, ids 1..n."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint16)
    cells = rng.choice((shape[0] // 8) * (shape[1] // 8), n, replace=False)
    for i, c in enumerate(cells, 1):
        y, x = divmod(int(c), shape[1] // 8)
        lab[8 * y + 2 : 8 * y + 6, 8 * x + 2 : 8 * x + 6] = i
    return lab


def test_split_key_strips_one_marker_and_the_extension() -> None:
    assert split_key("a_cp_masks.png") == ("a", True)
    assert split_key("a_masks.tif") == ("a", True)
    assert split_key("img_01_label.tiff") == ("img_01", True)
    assert split_key("a.tif") == ("a", False)
    assert split_key("_masks.tif") == ("_masks", False)  # nothing left: not a marker
    assert split_key("x_img.tif") == ("x_img", False)
    assert split_key("x_img_masks.tif") == ("x", True)  # cpsam segment's output for x_img.tif
    assert split_key("_img_masks.tif") == ("_img", True)


def test_find_label_files_prefers_marked_files_and_skips_underscore_folders(tmp_path: Path) -> None:
    lab = blobs(2, 0)
    for rel in ("d1/a_img.tif", "d1/a_masks.tif", "d2/b_cp_masks.png", "_qc/a.png", "notes.txt", "d1/a_flows.npz"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix in (".tif", ".png"):
            write_labels(p.with_suffix(".tif"), lab)
            p.with_suffix(".tif").rename(p)
        else:
            p.write_text("x")
    found = find_label_files(tmp_path)
    assert [(f.folder, f.key) for f in found] == [("d1", "a"), ("d2", "b")]
    flat = tmp_path / "flat"
    flat.mkdir()
    write_labels(flat / "c.tif", lab)
    assert [f.key for f in find_label_files(flat)] == ["c"]  # no marker anywhere: every file counts


def test_pair_files_nested_vs_flat_missing_extra_duplicates(tmp_path: Path) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    lab = blobs(3, 1)
    for rel in ("setA/x_masks.tif", "setA/y_masks.tif", "setB/z_masks.tif", "top_masks.tif"):
        write_labels(gt / rel, lab)
    for rel in ("x_cp_masks.tif", "x_img.tif", "setB/z_masks.tif", "top_label.tif", "w_masks.tif",
                "sub1/dup_masks.tif", "sub2/dup_masks.tif"):
        write_labels(pred / rel, lab)
    pairing = pair_files(pred, gt)
    got = {(p.dataset, p.key, p.prediction.relative_to(pred).as_posix()) for p in pairing.pairs}
    assert got == {("setA", "x", "x_cp_masks.tif"), ("setB", "z", "setB/z_masks.tif"), ("gt", "top", "top_label.tif")}
    assert [p.relative_to(gt).as_posix() for p in pairing.missing] == ["setA/y_masks.tif"]
    assert sorted(p.relative_to(pred).as_posix() for p in pairing.extra) == [
        "sub1/dup_masks.tif",  # key "dup" twice in the prediction tree: ambiguous, not paired
        "sub2/dup_masks.tif",
        "w_masks.tif",
    ]
    # a prediction folder with plain NAME.tif files (no marker anywhere) pairs with NAME_masks.tif
    plain = tmp_path / "plain"
    for rel in ("x.tif", "y.tif", "z.tif"):
        write_labels(plain / rel, lab)
    pairing = pair_files(plain, gt)
    assert sorted((p.dataset, p.key) for p in pairing.pairs) == [("setA", "x"), ("setA", "y"), ("setB", "z")]
    assert [p.name for p in pairing.missing] == ["top_masks.tif"] and pairing.extra == []


def test_summary_averages_per_image_and_sums_counts(tmp_path: Path) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    truth = {"dA/i1": blobs(10, 2), "dA/i2": blobs(4, 3), "dB/i3": blobs(6, 4)}
    preds = {}
    for rel, lab in truth.items():
        p = lab.copy()
        p[p == 1] = 0  # miss one object
        p[0:3, 0:3] = 50  # one false positive
        preds[rel] = p
        write_labels(gt / f"{rel}_masks.tif", lab)
        write_labels(pred / f"{Path(rel).name}_cp_masks.tif", p)
    pairing = pair_files(pred, gt)
    results = score_pairs(pairing, progress=False)
    rows = {r["dataset"]: r for r in summary_rows(results)}
    assert list(rows) == ["dA", "dB", "all"]
    per_image = {k: score_image(truth[k], preds[k]).at(0.5) for k in truth}
    err = {k: (s.fp + s.fn) / (s.tp + s.fn) for k, s in per_image.items()}
    assert err["dA/i1"] == 2 / 10 and err["dA/i2"] == 2 / 4
    assert rows["dA"]["error_rate@0.5"] == pytest.approx((2 / 10 + 2 / 4) / 2)  # mean of per-image values
    assert rows["dA"]["tp@0.5"] == 9 + 3 and rows["dA"]["n_true"] == 14 and rows["dA"]["n_images"] == 2
    assert rows["all"]["error_rate@0.5"] == pytest.approx((2 / 10 + 2 / 4 + 2 / 6) / 3)
    assert rows["all"]["ap@0.5"] == pytest.approx((9 / 11 + 3 / 5 + 5 / 7) / 3)
    md = report_markdown("t", pairing, results, (0.5, 0.75, 0.9))
    assert "| dA | 2 | 14 | 14 | 0.7091 |" in md  # mean AP of 9/11 and 3/5, 4 decimals
    written = write_report(tmp_path / "out" / "rep.csv", "t", pairing, results, (0.5, 0.75, 0.9))
    assert [p.name for p in written] == ["rep.csv", "rep_summary.csv", "rep.md"]
    with open(written[1]) as fh:
        summary = list(csv.DictReader(fh))
    assert [r["dataset"] for r in summary] == ["dA", "dB", "all"]
    assert float(summary[0]["error_rate@0.5"]) == pytest.approx(0.35, abs=0)  # full precision in CSV
    with open(written[0]) as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert not [p for p in (tmp_path / "out").iterdir() if ".part" in p.name]  # no temp file left


def test_bad_files_are_reported_per_file(tmp_path: Path) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_labels(gt / "a_masks.tif", blobs(3, 5))
    write_labels(gt / "b_masks.tif", blobs(3, 6))
    write_labels(gt / "c_masks.tif", blobs(3, 7))
    write_labels(pred / "a_masks.tif", blobs(3, 5))
    write_labels(pred / "b_masks.tif", blobs(3, 6, shape=(40, 48)))
    (pred / "c_masks.tif").write_bytes(b"")
    results = score_pairs(pair_files(pred, gt), progress=False)
    errors = {r.pair.key: r.error for r in results}
    assert errors["a"] is None
    assert "b_masks.tif: shape (40, 48) does not match ground truth" in errors["b"]
    assert errors["c"].endswith("c_masks.tif: file is empty (0 bytes)")
    assert [r["n_images"] for r in summary_rows(results)] == [1, 1]


def test_markdown_table_layout() -> None:
    table = markdown_table([{"a": 1, "b": 0.123456}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]


def _png_stats(path: Path) -> tuple[tuple[int, ...], int]:
    img = read_image(path)
    return img.shape, len(np.unique(img.reshape(-1, img.shape[-1]), axis=0))


def test_error_rate_bars_write_a_real_png(tmp_path: Path) -> None:
    summaries = {
        "teacher": [{"dataset": "a", "error_rate@0.5": 0.2}, {"dataset": "b", "error_rate@0.5": 0.4},
                    {"dataset": "all", "error_rate@0.5": 0.3}],
        "student": [{"dataset": "a", "error_rate@0.5": 0.25}, {"dataset": "all", "error_rate@0.5": 0.25}],
    }
    out = error_rate_bars(summaries, tmp_path / "bars.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shape, n_colours = _png_stats(out)
    assert shape[0] > 300 and shape[1] > 500 and n_colours > 50  # axes, two bar colours, anti-aliased text
    img = read_image(out)[..., :3].astype(int)
    blue = np.all(np.abs(img - [31, 119, 180]) < 10, axis=-1)  # matplotlib's first colour (C0)
    orange = np.all(np.abs(img - [255, 127, 14]) < 10, axis=-1)
    assert blue.sum() > 1000 and orange.sum() > 500


def test_accuracy_speed_scatter_writes_a_real_png(tmp_path: Path) -> None:
    pts = [SpeedPoint("cpsam", 12.0, 0.84), SpeedPoint("student-s", 0.4, 0.78), SpeedPoint("cyto3", 1.1, 0.71)]
    out = accuracy_speed_scatter(pts, tmp_path / "scatter.png")
    shape, n_colours = _png_stats(out)
    assert shape[0] > 300 and shape[1] > 400 and n_colours > 50
    assert not list(tmp_path.glob(".*part*"))
