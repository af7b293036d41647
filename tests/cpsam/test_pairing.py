"""cpsam.pairing: the one image/label naming rule, and its callers (prep, finetune, eval, distill) agreeing on it.

A hostile pickled `_seg.npy` is refused, with no code run, through every path that reads user labels.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cpsam import pairing
from cpsam.io import InputFileError, write_labels, write_tiff
from cpsam.pairing import LABEL_TAGS, find_label, label_key, pair_folder, read_label_file


def _labels(n: int = 2) -> np.ndarray:
    lab = np.zeros((24, 32), np.uint16)
    for i in range(1, n + 1):
        lab[4:10, 6 * i : 6 * i + 4] = i
    return lab


def _image(path: Path) -> Path:
    write_tiff(path, np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)) if path.suffix == ".tif" else \
        path.write_bytes(b"")
    return path


def _label(path: Path, n: int = 2) -> Path:
    if path.name.endswith("_seg.npy"):
        np.save(path, {"masks": _labels(n), "outlines": np.zeros((24, 32), np.uint16)}, allow_pickle=True)
    else:
        write_labels(path, _labels(n))
    return path


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a hostile `_seg.npy` could do with np.load(allow_pickle=True)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _hostile_seg(path: Path, marker: Path) -> Path:
    np.save(path, {"masks": _labels(), "x": _RunsCode(marker)}, allow_pickle=True)
    return path


# ------------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("tag", LABEL_TAGS)
def test_each_label_tag_names_the_label_of_an_image(tmp_path: Path, tag: str) -> None:
    image = _image(tmp_path / "a.tif")
    label = _label(tmp_path / f"a{tag}.png")
    assert find_label(image) == label
    assert label_key(label.name) == ("a", tag)
    assert pairing.is_label_or_output(label.name) and not pairing.is_label_or_output(image.name)
    np.testing.assert_array_equal(read_label_file(label), _labels())


def test_seg_npy_and_image_tags(tmp_path: Path) -> None:
    _image(tmp_path / "a.tif")
    seg = _label(tmp_path / "a_seg.npy")
    assert find_label(tmp_path / "a.tif") == seg and label_key(seg.name) == ("a", "_seg")
    np.testing.assert_array_equal(read_label_file(seg), _labels())
    # NAME_img / NAME_image images: NAME_masks.* first, then the full stem (cpsam segment's NAME_img_masks)
    img = _image(tmp_path / "b_img.tif")
    full = _label(tmp_path / "b_img_masks.tif")
    assert find_label(img) == full
    short = _label(tmp_path / "b_masks.tif")
    assert find_label(img) == short
    assert label_key("b_img_masks.tif") == ("b", "_masks") and label_key("b_image_cp_masks.png") == ("b", "_cp_masks")
    assert find_label(_image(tmp_path / "c_image.tif")) is None
    c_label = _label(tmp_path / "c_label.tif")
    assert find_label(tmp_path / "c_image.tif") == c_label
    # the Cellpose GUI names its file after the image's full stem: that one first
    gui = _label(tmp_path / "b_img_seg.npy")
    (tmp_path / "b_masks.tif").unlink(), full.unlink()
    assert find_label(img) == gui
    # upper-case suffixes, names that are only a marker, outputs that are no images
    assert find_label(_image(tmp_path / "d.tif")) is None
    upper = _label(tmp_path / "d_mask.tif").rename(tmp_path / "d_mask.TIF")
    assert find_label(tmp_path / "d.tif") == upper
    assert label_key("_masks.tif") == ("_masks", None) and label_key("a.tif") == ("a", None)
    assert all(pairing.is_label_or_output(n) for n in ("a_outlines.png", "a_flows.tif", "a_seg.npy"))


def test_precedence_when_several_label_files_exist(tmp_path: Path) -> None:
    image = _image(tmp_path / "a.tif")
    order = [tmp_path / f"a{tag}.tif" for tag in LABEL_TAGS] + [tmp_path / "a_seg.npy"]
    for path in order:
        _label(path)
    _label(tmp_path / "a_masks.png")  # same tag, later suffix
    for k, winner in enumerate(order):
        assert find_label(image) == winner, f"{winner.name} should win over {[p.name for p in order[k + 1:]]}"
        found = pair_folder(tmp_path)
        assert found.pairs == [(image, winner)]
        assert {p for p, by in found.shadowed} == set(order[k + 1:]) | ({tmp_path / "a_masks.png"} if k == 0 else set())
        assert all(by == winner for _, by in found.shadowed) and not found.orphans
        if k == 0:  # a_masks.tif before a_masks.png (LABEL_SUFFIXES order)
            (tmp_path / "a_masks.tif").unlink()
            assert find_label(image) == tmp_path / "a_masks.png"
            (tmp_path / "a_masks.png").unlink()
        else:
            winner.unlink()
    assert find_label(image) is None


def test_a_separate_labels_folder_is_searched_alone(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    a, b, c = (_image(images / f"{n}.tif") for n in "abc")
    _label(images / "c_masks.tif")  # beside the image: not used when a labels folder is given
    same = _label(masks / "a.png")
    tagged = _label(masks / "a_masks.tif")
    b_label = _label(masks / "b_cp_masks.tif")
    orphan = _label(masks / "z.tif")
    assert find_label(a, masks) == same and find_label(b, masks) == b_label and find_label(c, masks) is None
    found = pair_folder(images, masks)
    assert found.pairs == [(a, same), (b, b_label)]
    assert found.unlabelled == [c] and found.shadowed == [(tagged, same)]
    assert found.orphans == [images / "c_masks.tif", orphan]


def test_unlabelled_orphans_and_contested_are_counted(tmp_path: Path) -> None:
    pairs = {n: (_image(tmp_path / f"{n}.tif"), _label(tmp_path / f"{n}_masks.tif")) for n in ("p", "q")}
    unlabelled = [_image(tmp_path / "u1.tif"), _image(tmp_path / "u2.png")]
    orphans = [_label(tmp_path / "o1_masks.tif"), _label(tmp_path / "o2_seg.npy")]
    _image(tmp_path / "p_outlines.png"), _image(tmp_path / "p_flows.tif")  # outputs: neither image nor label
    (tmp_path / "notes.txt").write_text("x"), _image(tmp_path / ".hidden.tif")
    # cell_mask.tif is the image of cell_mask_masks.tif, not a label of cell.tif
    cell = (_image(tmp_path / "cell_mask.tif"), _label(tmp_path / "cell_mask_masks.tif"))
    # x_img.tif and x.tif both want x_masks.tif: _img wins, x.tif is contested
    x = (_image(tmp_path / "x_img.tif"), _label(tmp_path / "x_masks.tif"))
    _image(tmp_path / "x.tif")
    found = pair_folder(tmp_path)
    assert found.pairs == sorted([*pairs.values(), cell, x])
    assert found.unlabelled == unlabelled and found.orphans == orphans
    assert found.contested == [(tmp_path / "x.tif", x[1])] and found.shadowed == []
    assert pair_folder(tmp_path / "missing") == pairing.FolderPairs()


def test_eval_takes_the_label_file_of_highest_precedence_and_reports_the_rest(tmp_path: Path) -> None:
    from eval.pairing import find_label_files, pair_files

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for name in ("a_masks.tif", "b_masks.tif", "c_seg.npy"):
        _label(gt / name)
    for name in ("a_cp_masks.tif", "a_masks.png", "b_masks.tif", "b_seg.npy", "c_label.tif", "c_seg.npy"):
        _label(pred / name)
    assert [f.path.name for f in find_label_files(pred)] == ["a_masks.png", "b_masks.tif", "c_label.tif"]
    result = pair_files(pred, gt)
    assert [(p.key, p.reference.name, p.prediction.name) for p in result.pairs] == [
        ("a", "a_masks.tif", "a_masks.png"), ("b", "b_masks.tif", "b_masks.tif"), ("c", "c_seg.npy", "c_label.tif")]
    # two label images of one name are reported; a _seg.npy beside a label image gives way silently
    assert result.duplicates == [f"a: {pred / 'a_cp_masks.tif'}, {pred / 'a_masks.png'}"]
    assert result.missing == [] and result.extra == []


def test_finetune_still_refuses_two_images_of_one_name_and_one_label(tmp_path: Path) -> None:
    from train.finetune import FinetuneError, find_labelled_images

    _image(tmp_path / "a.tif"), _image(tmp_path / "a.png"), _label(tmp_path / "a_masks.tif")
    assert pair_folder(tmp_path).contested == [(tmp_path / "a.png", tmp_path / "a_masks.tif")]
    with pytest.raises(FinetuneError, match="a.tif and .*a.png have the same name 'a'"):
        find_labelled_images(tmp_path)
    (tmp_path / "a.tif").rename(tmp_path / "a_image.tif")  # another name: a.png is then unlabelled
    items, unlabelled = find_labelled_images(tmp_path)
    assert [(i.name, i.image.name) for i in items] == [("a_image", "a_image.tif")]
    assert unlabelled == [tmp_path / "a.png"]


# ------------------------------------------------------------------------------------ hostile _seg.npy


def test_a_hostile_seg_npy_is_refused_on_every_path(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        _image(folder / f"{name}.tif")
    seg = _hostile_seg(folder / "a_seg.npy", marker)
    _label(folder / "b_masks.tif")
    with pytest.raises(InputFileError, match="a_seg.npy"):
        read_label_file(seg)

    # prep: the folder converter and the Cellpose-GUI converter
    from data_prep.convert import convert
    from data_prep.sources import get_source

    rep = convert(get_source("folder"), folder, tmp_path / "prep", progress=False)
    assert list(rep.failed) == ["a"] and "a_seg.npy" in rep.failed["a"]
    rep = convert(get_source("seg_npy"), folder, tmp_path / "prep_seg", progress=False)
    assert list(rep.failed) == ["a"] and "not a readable Cellpose _seg.npy" in rep.failed["a"]

    # finetune: discovery finds it, reading it (what build_dataset does) refuses it
    from train import finetune

    items, _ = finetune.find_labelled_images(folder)
    assert {i.name: i.labels for i in items}["a"] == seg
    with pytest.raises(InputFileError, match="a_seg.npy"):
        finetune.read_label_file(seg)

    # eval: the GUI file is the ground truth of key 'a'; scoring it gives an error naming the file
    from eval.pairing import pair_files
    from eval.report import score_pairs

    pred = tmp_path / "pred"
    _label(pred / "a_masks.tif")
    results = score_pairs(pair_files(pred, folder), progress=False)
    assert [(r.pair.key, r.error is not None) for r in results] == [("a", True)]
    assert "a_seg.npy" in results[0].error

    # distill eval: the labels that come with the images
    from distill.evaluate import list_eval_images

    labels = {i.name: i.labels for i in list_eval_images([folder], gt="auto")}
    assert labels["a"] == seg
    with pytest.raises(InputFileError):
        pairing.read_label_file(labels["a"])
    assert not marker.exists()
    np.load(seg, allow_pickle=True)  # what the file does to a reader that trusts it
    assert marker.is_dir()


# ------------------------------------------------------------------------------------- callers agree


def test_prep_finetune_eval_and_distill_agree_on_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    expected = {}
    for image, label in [("a.tif", "a_masks.tif"), ("b_img.tif", "b_cp_masks.tif"), ("c.tif", "c_seg.npy"),
                         ("d.tif", "d_masks.tif"), ("cell_mask.tif", "cell_mask_masks.tif"),
                         ("e_image.tif", "e_label.tif")]:
        expected[_image(folder / image)] = _label(folder / label)
    _label(folder / "d_labels.tif")  # shadowed by d_masks.tif
    _image(folder / "u.tif")  # no label
    _label(folder / "o_mask.tif")  # no image
    _image(folder / "a_outlines.png")  # an output
    pairs = sorted(expected.items())

    found = pair_folder(folder)
    assert found.pairs == pairs
    assert found.unlabelled == [folder / "u.tif"] and found.orphans == [folder / "o_mask.tif"]
    assert found.shadowed == [(folder / "d_labels.tif", folder / "d_masks.tif")]

    from train.finetune import find_labelled_images

    items, unlabelled = find_labelled_images(folder)
    assert [(i.image, i.labels) for i in items] == pairs and unlabelled == [folder / "u.tif"]

    from data_prep.sources import get_source

    raw_items = get_source("folder").items(folder)
    prep_pairs = sorted((folder / i.ref[0], folder / i.ref[1]) for i in raw_items if not i.name.endswith("#unpaired"))
    assert prep_pairs == pairs
    unpaired = sorted(i.ref[0] for i in raw_items if i.name.endswith("#unpaired"))
    assert unpaired == ["d_labels.tif", "o_mask.tif", "u.tif"]

    # eval: the same files are label files; each has the key of its image (finetune's example name, less _image)
    from eval.pairing import find_label_files, pair_files

    keys = {f.path: f.key for f in find_label_files(folder)}
    assert {keys[label] for _, label in pairs} == {"a", "b", "c", "d", "cell_mask", "e"}
    assert {i.name for i in items} == {"a", "b", "c", "d", "cell_mask", "e_image"}
    # ... and a prediction folder named the way cpsam segment names its outputs pairs with them
    pred = tmp_path / "pred"
    for image, _ in pairs:
        _label(pred / f"{image.stem}_masks.tif")
        shutil.copy(pred / f"{image.stem}_masks.tif", pred / f"{image.stem}_seg.npy")  # gives way to _masks
    result = pair_files(pred, folder)
    assert sorted((p.reference, p.prediction.name) for p in result.pairs) == sorted(
        (label, f"{image.stem}_masks.tif") for image, label in pairs)
    assert result.extra == [] and [p.name for p in result.missing] == ["o_mask.tif"]

    from distill.evaluate import list_eval_images

    listed = list_eval_images([folder], gt="auto")
    assert sorted((i.image, i.labels) for i in listed if i.labels is not None) == pairs
