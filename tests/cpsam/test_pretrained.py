"""MXNet .params reader (hand-built bytes, no network) and `pretrained("cyto_0")` from the PyPI wheel."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cpsam.models
from cpsam.models.mxnet_params import MXNetParamsError, parse_mxnet_params, read_mxnet_params
from cpsam.models.pretrained import (
    PRETRAINED,
    PretrainedUnavailableError,
    cache_dir,
    fetch_wheel,
    mxnet_to_cpnet_key,
    pretrained_state_dict,
)

# `cpsam.models.pretrained` is the function; the module object is needed for monkeypatching.
pretrained_module = sys.modules["cpsam.models.pretrained"]

V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA


# ---------------------------------------------------------------- hand-built .params byte strings


def record_v2(arr: np.ndarray, type_flag: int, stype: int = 0) -> bytes:
    head = struct.pack("<IiI", V2, stype, arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
    return head + struct.pack("<iii", 1, 0, type_flag) + arr.tobytes()


def record_v1(arr: np.ndarray, type_flag: int) -> bytes:
    head = struct.pack("<I", V1) + struct.pack("<I", arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
    return head + struct.pack("<iii", 2, 1, type_flag) + arr.tobytes()  # saved from a GPU context


def record_legacy(arr: np.ndarray, type_flag: int) -> bytes:
    head = struct.pack("<I", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
    return head + struct.pack("<iii", 1, 0, type_flag) + arr.tobytes()


def params_file(records: list[bytes], names: list[str]) -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(records)) + b"".join(records) + struct.pack("<Q", len(names))
    for name in names:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    return out


A = np.arange(6, dtype="<f4").reshape(2, 3) / 7
B = np.array([-3, 5, 2**31 - 1, 0], dtype="<i4")
C = np.array([[1.5], [-2.25]], dtype="<f8")
D = np.arange(24, dtype="<f2").reshape(1, 2, 3, 4)


def test_reader_reads_every_record_version_back() -> None:
    data = params_file(
        [record_v2(A, 0), record_legacy(B, 4), record_v1(C, 1), record_v2(D, 2)],
        ["net.0.weight", "net.0.idx", "aux:running_mean", "net.1.gamma"],
    )
    got = parse_mxnet_params(data)
    assert list(got) == ["net.0.weight", "net.0.idx", "aux:running_mean", "net.1.gamma"]
    for arr, ref in zip(got.values(), [A, B, C, D], strict=True):
        assert arr.dtype == ref.dtype and arr.shape == ref.shape
        np.testing.assert_array_equal(arr, ref)
    assert got["net.0.weight"].flags.writeable and got["net.0.weight"].flags.c_contiguous


def test_reader_unnamed_list_and_empty_record() -> None:
    empty = struct.pack("<IiI", V2, 0, 0)  # ndim 0: nothing follows
    got = parse_mxnet_params(params_file([record_v2(A, 0), empty, record_v2(B, 4)], []))
    assert list(got) == ["0", "2"]
    np.testing.assert_array_equal(got["2"], B)


def test_reader_reads_files_and_names_them(tmp_path: Path) -> None:
    path = tmp_path / "tiny.params"
    path.write_bytes(params_file([record_v2(A, 0)], ["w"]))
    np.testing.assert_array_equal(read_mxnet_params(path)["w"], A)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(MXNetParamsError, match=r"tiny\.params: not an MXNet \.params file: header magic 0x0"):
        read_mxnet_params(path)


GOOD = params_file([record_v2(A, 0), record_v2(B, 4)], ["a", "b"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than the 16-byte header"),
        (GOOD[:-3], "truncated"),
        (GOOD[:60], "truncated"),
        (GOOD + b"\x00", "1 unexpected trailing bytes"),
        (params_file([record_v2(A, 0), record_v2(B, 4)], ["a"]), "1 names for 2 arrays"),
        (params_file([record_v2(A, 0), record_v2(B, 4)], ["a", "a"]), "duplicate array names"),
        (params_file([record_v2(A, 0, stype=1)], ["a"]), "sparse storage type 1"),
        (params_file([struct.pack("<I", V3) + b"\x00" * 32], ["a"]), "V3 record"),
        (params_file([struct.pack("<I", 0xDEADBEEF)], ["a"]), "unknown magic 0xDEADBEEF"),
        (params_file([record_v2(A, 0)[:-28] + struct.pack("<i", 99) + A.tobytes()], ["a"]), "dtype flag 99"),
    ],
)
def test_reader_rejects_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(MXNetParamsError, match=message):
        parse_mxnet_params(data, source="x.params")


# ---------------------------------------------------------------- name mapping


@pytest.mark.parametrize(
    ("mx", "torch_key"),
    [
        ("downsample.down.0.conv.0.0.gamma", "downsample.down.res_down_0.conv.conv_0.0.weight"),
        ("downsample.down.3.conv.2.2.weight", "downsample.down.res_down_3.conv.conv_2.2.weight"),
        ("downsample.down.1.proj.0.beta", "downsample.down.res_down_1.proj.0.bias"),
        ("downsample.down.1.proj.0.running_var", "downsample.down.res_down_1.proj.0.running_var"),
        ("upsample.up.2.conv.1.conv.0.gamma", "upsample.up.res_up_2.conv.conv_1.conv.0.weight"),
        ("upsample.up.0.conv.3.full.weight", "upsample.up.res_up_0.conv.conv_3.full.weight"),
        ("upsample.up.3.conv.0.0.running_mean", "upsample.up.res_up_3.conv.conv_0.0.running_mean"),
        ("upsample.up.1.proj.1.bias", "upsample.up.res_up_1.proj.1.bias"),
        ("output.0.beta", "output.0.bias"),
        ("output.2.weight", "output.2.weight"),
    ],
)
def test_mxnet_to_cpnet_key(mx: str, torch_key: str) -> None:
    assert mxnet_to_cpnet_key(mx) == torch_key


# ---------------------------------------------------------------- the PyPI cyto_0 weights


@pytest.fixture(scope="session")
def cyto0_wheel() -> Path:
    """The cellpose==0.0.1 wheel in the user cache ($CPSAM_CACHE or ~/.cache/cpsam), downloaded once."""
    return fetch_wheel("cyto_0")


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run when the wheel or the converted file is cached")


def test_pretrained_cyto0_equals_shared_weights(
    cyto0_wheel: Path, cyto0_state_dict: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converted from the MXNet file in the wheel, every tensor equals the reference conversion."""
    shutil.copy(cyto0_wheel, tmp_path / cyto0_wheel.name)  # a wheel placed by hand, as offline users do
    monkeypatch.setattr(pretrained_module.subprocess, "run", _no_pip)
    monkeypatch.setenv("CPSAM_CACHE", str(tmp_path))
    model = cpsam.models.pretrained("cyto_0")
    assert not model.training and model.nbase == [2, 32, 64, 128, 256]
    assert float(model.diam_mean) == 27.0 and float(model.diam_labels) == 27.0
    ours = model.state_dict()
    assert list(ours) == list(cyto0_state_dict)
    for key, ref in cyto0_state_dict.items():
        assert ours[key].dtype == ref.dtype and torch.equal(ours[key], ref), key

    converted = tmp_path / "cyto_0_cpnet.pt"
    assert converted.is_file() and (converted.stat().st_mode & 0o444) == 0o444
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    (tmp_path / cyto0_wheel.name).unlink()  # the converted file alone now suffices
    again = pretrained_state_dict("cyto_0")
    assert all(torch.equal(again[k], v) for k, v in cyto0_state_dict.items())


def test_cached_wheel_is_the_gpl_release(cyto0_wheel: Path) -> None:
    """The session fixture's wheel (pip download into the user cache) holds the weights and its license."""
    assert cyto0_wheel.parent in (cache_dir(), cache_dir() / "wheels")
    with zipfile.ZipFile(cyto0_wheel) as zf:
        assert PRETRAINED["cyto_0"].member in zf.namelist()
        assert "GNU GENERAL PUBLIC LICENSE" in zf.read("cellpose-0.0.1.dist-info/LICENSE").decode()


def test_pip_failure_says_what_to_do_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real pip failure (no index): the error names the wheel, $CPSAM_CACHE and the converted file."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CPSAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PretrainedUnavailableError) as info:
        cpsam.models.pretrained("cyto_0")
    message = str(info.value)
    assert "pip download cellpose==0.0.1` failed" in message
    assert "cellpose-0.0.1-py3-none-any.whl" in message and "$CPSAM_CACHE" in message
    assert str(tmp_path / "cache") in message and "cyto_0_cpnet.pt" in message
    assert not (tmp_path / "cache" / "cyto_0_cpnet.pt").exists()
    assert os.listdir(tmp_path / "cache" / "wheels") == []  # the pip temp folder is gone
    notices = [r.getMessage() for r in caplog.records if r.name == "cpsam.models.pretrained"]
    assert len(notices) == 1 and "license GPL-3.0" in notices[0] and "cellpose==0.0.1" in notices[0]


def test_corrupt_wheel_and_cache_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained_module.subprocess, "run", _no_pip)
    wheel = tmp_path / "cellpose-0.0.1-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(PretrainedUnavailableError, match="cannot read cellpose/models/cyto_0.*delete the"):
        pretrained_state_dict("cyto_0", cache=tmp_path)

    with zipfile.ZipFile(wheel, "w") as zf:  # right name, wrong bytes
        zf.writestr("cellpose/models/cyto_0", params_file([record_v2(A, 0)], ["w"]))
    with pytest.raises(PretrainedUnavailableError, match="has sha256 .* expected dfc4dd84"):
        pretrained_state_dict("cyto_0", cache=tmp_path)

    (tmp_path / "cyto_0_cpnet.pt").write_bytes(b"garbage")
    with pytest.raises(PretrainedUnavailableError, match=r"cyto_0_cpnet\.pt: cannot load the cached weights"):
        pretrained_state_dict("cyto_0", cache=tmp_path)


def test_cache_location_and_unknown_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CPSAM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CPSAM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "cpsam"
    with pytest.raises(ValueError, match="unknown pretrained model 'cyto3'; known: cyto_0"):
        cpsam.models.pretrained("cyto3")
