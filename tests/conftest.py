"""Shared pytest fixtures and helpers, so that test files do not rebuild them.

- ../shared (or $CPSAM_SHARED): `shared_path` skips the calling test, with a reason, when a file is absent.
- The classic Cellpose weights in ../shared/weights: `cyto0_file`, `cyto0_state_dict`, `cyto0_net`,
  `size_model_file`, `cyto_size_model`; cellpose 3.1.1.2's outputs with them in ../shared/golden/cellpose3_cyto0:
  `cyto0_golden_cases`, `read_golden_masks`, `load_golden_flows`.
- Real annotated images in ../shared/data (`FOLDER/NAME_img.tif` beside `FOLDER/NAME_masks.tif`):
  `shared_image_path`, `shared_masks_path`, `read_shared_image`, `read_shared_masks`, `read_shared_pair`,
  `shared_manifest`, and `write_shared_canonical` (a small canonical dataset of such pairs).
- Tiny random networks: `cpsam_tiny` (fixture), `tiny_cpnet` / `save_tiny_cpnet` / `save_fastnet_student`
  (helpers).
- Synthetic labels and pair files: `label_squares`, `write_pair`.

Session-scoped fixtures hand the same object to every test: tests read them and never change them in place
(copy first, e.g. `dict(cyto0_state_dict)` before replacing a key). Function-scoped ones are fresh per test.
"""

from __future__ import annotations

import contextlib
import io as stdio
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cpsam import io
from cpsam.cli import main as cpsam_main
from cpsam.models import CellposeSAM, CPnet, cpnet_from_state_dict, create_model, save_checkpoint
from cpsam.size import SizeModel, load_size_model
from data_prep.canonical import write_example, write_index

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CPSAM_SHARED", REPO_ROOT.parent / "shared"))


def pytest_configure(config: pytest.Config) -> None:
    """A test run started in the background by a shell without job control inherits SIGINT ignored (POSIX), and
    so would every command the tests start (an ignored signal stays ignored across exec): the Ctrl-C tests need
    the interactive default, Python's KeyboardInterrupt (a handler is reset to the default in children)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def shared_path(*parts: str) -> Path:
    """Path inside ../shared (or $CPSAM_SHARED); skips the calling test when it does not exist."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the project's shared/ folder beside the repo")
    return path


@pytest.fixture
def shared() -> Path:
    """The ../shared folder (skips the test when absent)."""
    return shared_path()


# ------------------------------------------------------------------ the classic Cellpose weights (cyto_0)


@pytest.fixture(scope="session")
def cyto0_file() -> Path:
    """../shared/weights/cyto_0_cpnet_torch.pt: Cellpose's 2020 cyto net (CPnet nbase [2, 32, 64, 128, 256],
    diam_mean 27) as a plain torch state_dict file."""
    return shared_path("weights", "cyto_0_cpnet_torch.pt")


@pytest.fixture(scope="session")
def cyto0_state_dict(cyto0_file: Path) -> dict[str, torch.Tensor]:
    """The cyto_0 state_dict, loaded once (CPU, weights_only): 313 tensors in cellpose 3's key order, float32
    except the int64 BatchNorm counters; `diam_mean` and `diam_labels` are (1,) tensors of 27.0.

    Shared by the whole session: copy the dict before adding, replacing or deleting keys; never change a tensor.
    """
    return torch.load(cyto0_file, map_location="cpu", weights_only=True)


@pytest.fixture
def cyto0_net(cyto0_state_dict: dict[str, torch.Tensor]) -> CPnet:
    """A fresh CPnet holding the cyto_0 weights, in eval mode, on the CPU (the test may change it)."""
    return cpnet_from_state_dict(cyto0_state_dict).eval()


@pytest.fixture(scope="session")
def size_model_file() -> Path:
    """../shared/weights/size_cyto_A.npy: cellpose's size model for cyto_0 (a pickled dict of A (256,), smean
    (256,), diam_mean 27.0 and ymean; a trusted test file)."""
    return shared_path("weights", "size_cyto_A.npy")


@pytest.fixture(scope="session")
def cyto_size_model(size_model_file: Path) -> SizeModel:
    """`load_size_model(size_model_file)`: cyto_0's size model (style_channels 256, diam_mean 27.0); read only."""
    return load_size_model(size_model_file)


# ------------------------------------------------------------------ cellpose 3.1.1.2's outputs for cyto_0


@pytest.fixture(scope="session")
def cyto0_golden_cases() -> list[dict]:
    """../shared/golden/cellpose3_cyto0/cases.json's "cases": four real images (`folder`, `name` in
    ../shared/data, `image_shape`, `n_masks`) with every setting cellpose 3.1.1.2's `CellposeModel.eval` ran them
    with (channels, diameter, flow/cellprob thresholds, augment, tile_overlap, bsize, min_size, niter, resample,
    normalize). Read only."""
    return json.loads(shared_path("golden", "cellpose3_cyto0", "cases.json").read_text())["cases"]


def read_golden_masks(name: str) -> np.ndarray:
    """The (H, W) uint16 masks cellpose 3.1.1.2 with cyto_0 gave for the image NAME of `cyto0_golden_cases`."""
    return tifffile.imread(shared_path("golden", "cellpose3_cyto0", f"{name}_masks.tif"))


def load_golden_flows(name: str) -> np.lib.npyio.NpzFile:
    """cellpose 3.1.1.2's flows for the image NAME at the image's size: `dP` (2, H, W) float32 [dY, dX] and
    `cellprob` (H, W) float32."""
    return np.load(shared_path("golden", "cellpose3_cyto0", f"{name}_flows.npz"))


# ------------------------------------------------------------------ real annotated images (../shared/data)


def shared_image_path(folder: str, name: str) -> Path:
    """../shared/data/FOLDER/NAME_img.tif (skips the test when absent)."""
    return shared_path("data", folder, f"{name}_img.tif")


def shared_masks_path(folder: str, name: str) -> Path:
    """../shared/data/FOLDER/NAME_masks.tif, the image's instance labels (skips the test when absent)."""
    return shared_path("data", folder, f"{name}_masks.tif")


def read_shared_image(folder: str, name: str) -> np.ndarray:
    """The image as tifffile reads it: (H, W), (H, W, 3) RGB or (C, H, W) as stored (see the manifest's
    `image_shape` and `axes`); uint8 or uint16 as stored."""
    return tifffile.imread(shared_image_path(folder, name))


def read_shared_masks(folder: str, name: str) -> np.ndarray:
    """The image's instance labels as tifffile reads them: (H, W) uint16, 0 = background."""
    return tifffile.imread(shared_masks_path(folder, name))


def read_shared_pair(folder: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(`read_shared_image`, `read_shared_masks`) of one annotated image; skips the test when either is absent."""
    image_path, masks_path = shared_image_path(folder, name), shared_masks_path(folder, name)
    return tifffile.imread(image_path), tifffile.imread(masks_path)


@pytest.fixture(scope="session")
def shared_manifest() -> list[dict]:
    """../shared/data/manifest.json: one record per annotated image, with `folder`, `name`, `image` and `mask`
    (paths relative to ../shared/data), `image_shape`, `n_objects`, `median_equiv_diameter_px` and, for 3-D
    images, `axes` (YXS unless it says CYX). Read only."""
    return json.loads(shared_path("data", "manifest.json").read_text())


def write_shared_canonical(
    root: Path,
    examples: Sequence[tuple[str, str, str]],
    *,
    dataset: str | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Write a canonical dataset at `root` of real annotated images and return `root`.

    `examples`: (folder, name, split) of images in ../shared/data, read with `cpsam.io.read_image` /
    `read_labels` and written whole (no crop) with `write_example` and `write_index`. Each row's dataset is
    `dataset` (default: the image's folder), its example name `names[k]` (default: the image's name), its
    license "test" and its source the image's folder.
    """
    rows = []
    for k, (folder, name, split) in enumerate(examples):
        base = shared_path("data", folder)
        image = io.read_image(shared_image_path(folder, name))
        masks = io.read_labels(shared_masks_path(folder, name))
        rows.append(write_example(root, names[k] if names else name, image, masks, dataset=dataset or folder,
                                  split=split, license="test", source=str(base)))
    write_index(root, rows)
    return root


# ------------------------------------------------------------------ tiny random networks


@pytest.fixture
def cpsam_tiny() -> CellposeSAM:
    """`create_model("cpsam_tiny")` built right after `torch.manual_seed(0)`, in eval mode: a small CP-SAM ViT
    (256-px tiles, 3 input channels, output (B, 3, 256, 256)) with random weights, fresh for each test.

    The global torch RNG is left where that build leaves it, as if the test had written the two lines itself.
    """
    torch.manual_seed(0)
    return create_model("cpsam_tiny").eval()


def tiny_cpnet() -> CPnet:
    """A small random classic Cellpose net, `create_model("cpnet", nbase=[2, 16, 32], diam_mean=30.0)`, built
    right after `torch.manual_seed(0)` (the same weights at every call; the global torch RNG is left where that
    build leaves it). In train mode, as built."""
    torch.manual_seed(0)
    return create_model("cpnet", nbase=[2, 16, 32], diam_mean=30.0)


def save_tiny_cpnet(path: Path) -> Path:
    """`tiny_cpnet()` saved as a cpsam checkpoint at `path` (a teacher file for distillation); returns the path."""
    return save_checkpoint(path, tiny_cpnet())


def save_fastnet_student(path: Path) -> Path:
    """A random FastNet student, `create_model("fastnet-1-32-64")` built right after `torch.manual_seed(0)`, with
    `diam_mean` and `diam_labels` set to cyto_0's 27.0, saved in eval mode as a cpsam checkpoint at `path`
    (e.g. RUN/model.pt); returns the path. The global torch RNG is left where that build leaves it."""
    torch.manual_seed(0)
    student = create_model("fastnet-1-32-64")
    student.diam_mean.data.fill_(27.0)
    student.diam_labels.data.fill_(27.0)
    return save_checkpoint(path, student.eval())


# ------------------------------------------------------------------ synthetic labels and pair files


def label_squares(
    shape: tuple[int, int] = (60, 60),
    boxes: Sequence[tuple[int, int]] = ((5, 5), (5, 35), (35, 5), (35, 35)),
    side: int = 16,
) -> np.ndarray:
    """A (H, W) uint16 label image of `side` x `side` squares with top-left corners `boxes`, labelled 1, 2, ...
    in that order (a later square overwrites an earlier one where they overlap); 0 = background."""
    masks = np.zeros(shape, np.uint16)
    for k, (y, x) in enumerate(boxes, start=1):
        masks[y : y + side, x : x + side] = k
    return masks


def write_pair(folder: Path, name: str, image: np.ndarray, masks: np.ndarray | None) -> None:
    """Write FOLDER/NAME_img.tif (`cpsam.io.write_tiff`) and, unless `masks` is None, FOLDER/NAME_masks.tif
    (`cpsam.io.write_labels`); creates the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    io.write_tiff(folder / f"{name}_img.tif", image)
    if masks is not None:
        io.write_labels(folder / f"{name}_masks.tif", masks)


# --------------------------------------------------------------------------- running commands (hostile-input corpora)


def cli(*argv: str | Path) -> tuple[int, str, str]:
    """Run `cpsam ARGV` in this process: (exit code, stdout, stderr); argparse's exit is an exit code."""
    out, err = stdio.StringIO(), stdio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cpsam_main([str(a) for a in argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def line_with(text: str, *words: str) -> str:
    """The one line of `text` containing every word (fails when there is not exactly one)."""
    hits = [line.strip() for line in text.replace("\r", "\n").splitlines() if all(w in line for w in words)]
    assert len(hits) == 1, (words, text)
    return hits[0]


TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "')


def no_traceback(*texts: str, markers: Sequence[str] = TRACEBACK_MARKERS) -> None:
    """No text holds any of `markers` (by default: the signs of a Python traceback)."""
    for text in texts:
        assert not any(m in text for m in markers), text


def no_temp_files(root: Path) -> None:
    """No temporary (`.part`) or write-check file is left under `root`."""
    assert not [p for p in root.rglob("*") if ".part" in p.name or ".cpsam-write-check" in p.name]


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with `mount` on the PATH)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (skips the test when this process may not mount)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """An existing, empty folder this process cannot write into."""
    folder = tmp_path / "readonly"
    if can_mount():
        with tmpfs(folder, "ro,size=64k"):
            yield folder
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root without mount: chmod cannot make a folder read-only for root")
    folder.mkdir()
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def free_port() -> int:
    """A TCP port free on this machine now (the kernel's pick), for a launcher's rendezvous: fixed ports collide
    when test runs overlap."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

