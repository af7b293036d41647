"""`cpsam distill export`: one TorchScript file that segments like `cpsam segment`, without this package."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_fastnet_student, shared_path

from cpsam import io
from cpsam.dynamics import torch_rules
from cpsam.metrics import score_image
from cpsam.models import load_model
from cpsam.segment import Segmenter
from distill import export

IMAGES = (  # (file, top, left, side): a phase-contrast bacteria image and a fluorescence nuclei crop
    ("data/bact_phase_neurips22/neurips22_cell_00528_img.tif", 0, 0, 200),
    ("data/fluo_nuclei_ctc_N2DL-HeLa/Fluo-N2DL-HeLa_02_t075_img.tif", 250, 400, 160),
)

# Runs the exported file in a fresh interpreter that cannot import cpsam (nor numba, OpenCV, scipy, ...).
RUNNER = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = {"cpsam", "distill", "eval", "train", "data_prep", "numba", "cv2", "scipy", "fastremap", "fill_voids"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    import numpy as np, torch
    torch.set_num_threads(1)
    seg = torch.jit.load(sys.argv[1])
    data = np.load(sys.argv[2])
    out = {}
    for key in data.files:
        masks, flows = seg(torch.from_numpy(data[key].astype(np.float32)), float(sys.argv[3]))
        out[key] = masks.numpy()
        out[key + "_flows"] = flows.numpy()
    np.savez(sys.argv[4], **out)
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
""")


def _images() -> list[np.ndarray]:
    out = []
    for rel, top, left, side in IMAGES:
        path = shared_path(rel)
        out.append(np.ascontiguousarray(io.read_image(path)[top : top + side, left : left + side]))
    return out


@pytest.fixture(scope="module")
def cyto0_results(cyto0_file):
    """(cyto_0 model, images, their `Segmenter` results at diameter 20): computed once for this module."""
    images = _images()
    model = load_model(cyto0_file)
    seg = Segmenter(model)
    return model, images, [seg.segment([image], diameter=20.0)[0] for image in images]


def _run_isolated(model_file: Path, images: list[np.ndarray], diameter: float, tmp_path: Path) -> dict:
    npz, res = tmp_path / "images.npz", tmp_path / "result.npz"
    np.savez(npz, *images)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(model_file), str(npz), str(diameter), str(res)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["modules"] == []
    with np.load(res) as data:
        return {k: data[k] for k in data.files}


def test_exported_cyto0_gives_the_masks_of_cpsam_segment_without_cpsam(tmp_path, cyto0_results):
    """cyto_0 (a CPnet: cellpose 3 rules) exported and run with only torch + numpy importable."""
    model, images, refs = cyto0_results
    assert export.flows_to_masks_torch is torch_rules.flows_to_masks  # the one torch implementation
    out = export.export_model(model, tmp_path / "cyto0.pt")
    assert out.is_file() and not list(tmp_path.glob("*.part*"))
    results = _run_isolated(out, images, 20.0, tmp_path)
    for k, (image, ref) in enumerate(zip(images, refs, strict=True)):
        masks, flows = results[f"arr_{k}"], results[f"arr_{k}_flows"]
        assert masks.shape == image.shape[:2] and flows.shape == (3, *image.shape[:2])
        assert np.abs(flows[:2] - ref.dP).max() < 1e-4 and np.abs(flows[2] - ref.cellprob).max() < 1e-4
        assert ref.n_cells >= 10  # real cells, not an empty agreement
        ap = score_image(ref.masks, masks, thresholds=(0.5,)).at(0.5).ap
        assert ap >= 0.99, f"image {k}: AP@0.5 {ap:.3f} against cpsam segment"


def test_exported_fastnet_student_matches_segmenter_flows(tmp_path):
    """A FastNet student (BatchNorm folded, cellpose 4 rules) exported through the CLI: shapes and flows."""
    images = _images()[:1]
    ckpt = save_fastnet_student(tmp_path / "run" / "model.pt")
    from cpsam.cli import main

    target = tmp_path / "student.pt"
    assert main(["distill", "export", "--model", str(ckpt), "--out", str(target)]) == 0
    scripted = torch.jit.load(str(target))
    masks, flows = scripted(torch.from_numpy(images[0].astype(np.float32)), 20.0)
    ref = Segmenter(load_model(ckpt)).segment([images[0]], diameter=20.0)[0]
    assert masks.dtype == torch.int32 and tuple(masks.shape) == images[0].shape[:2]
    assert np.abs(flows[:2].numpy() - ref.dP).max() < 1e-4
    assert np.abs(flows[2].numpy() - ref.cellprob).max() < 1e-4
    assert scripted.mask_rules == "cp4" and scripted.pad_to_tile
    # under its cyto_0 teacher's rules (cellpose 3: tiles shrink to small images, float32 rescale, cp3 masks)
    assert main(["distill", "export", "--model", str(ckpt), "--out", str(target), "--rules", "cp3"]) == 0
    cp3 = torch.jit.load(str(target))
    assert cp3.mask_rules == "cp3" and not cp3.pad_to_tile and cp3.float32_rescale
    small = torch.from_numpy(images[0][:100, :120].astype(np.float32))
    rules = export.named_rules("cp3", 224)
    want = Segmenter(load_model(ckpt), rules=rules).segment([small.numpy()], diameter=20.0)[0]
    masks, flows = cp3(small, 20.0)
    assert np.abs(flows[2].numpy() - want.cellprob).max() < 1e-4
    assert np.array_equal(masks.numpy(), want.masks.astype(np.int32))


def test_export_cli_reports_a_bad_model_in_one_line(tmp_path, capsys):
    from cpsam.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_text("not a model")
    target = tmp_path / "out.pt"
    assert main(["distill", "export", "--model", str(bad), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0] and "cannot load" in err[0]
    assert not target.exists()
