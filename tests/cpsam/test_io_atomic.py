"""An interruption (Ctrl-C, SIGTERM) that lands in the narrow windows of an atomic write leaves no file.

CI once found a `.NAME.xxxxxxxx.part.npy` after Ctrl-C of `cpsam segment` (tests/test_hostile_inputs.py):
the signal had landed after the temporary file was created and before its name was recorded. These
tests put a KeyboardInterrupt into each such window, deterministically.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cpsam import io, segment_cli


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, module, name: str, calls: int = 1) -> None:
    """Make `module.name` do its work, then raise KeyboardInterrupt on its `calls`-th call."""
    real = getattr(module, name)
    seen = [0]

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == calls:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(module, name, wrapped)


def test_interrupt_right_after_the_temporary_file_is_created_leaves_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_after(monkeypatch, os, "close")  # the temp exists, its fd is closed, _create_temp not returned
    with pytest.raises(KeyboardInterrupt), io.atomic_path(tmp_path / "a.npy") as tmp:
        np.save(tmp, np.zeros(3))
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("calls", [1, 2])
def test_interrupt_right_after_a_rename_of_a_set_removes_the_whole_set(tmp_path: Path, calls: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    finals = [tmp_path / "report.md", tmp_path / "table.csv"]
    _interrupt_after(monkeypatch, os, "replace", calls)
    with pytest.raises(KeyboardInterrupt), io.atomic_paths(finals) as temps:
        for tmp in temps:
            tmp.write_text("x")
    assert sorted(tmp_path.iterdir()) == []


def test_a_failed_rename_keeps_the_old_file_it_could_not_replace(tmp_path: Path) -> None:
    old = tmp_path / "table.csv"
    old.write_text("old")
    blocker = tmp_path / "report.md"
    blocker.mkdir()
    (blocker / "inside").write_text("a folder is not replaced by a file")
    with pytest.raises(OSError), io.atomic_paths([blocker, old]) as temps:
        for tmp in temps:
            tmp.write_text("new")
    assert old.read_text() == "old" and blocker.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "table.csv"]


@pytest.mark.parametrize("writer", ["write_labels", "write_seg_npy", "write_png"])
def test_segment_outputs_interrupted_right_after_one_file_leave_no_partial_set(tmp_path: Path, writer: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    masks = np.zeros((32, 32), np.uint16)
    masks[4:12, 4:12] = 1
    result = SimpleNamespace(masks=masks, dP=np.zeros((2, 32, 32), np.float32),
                             cellprob=np.zeros((32, 32), np.float32), diameter=30.0)
    args = SimpleNamespace(channels=None, channel_axis=None)
    _interrupt_after(monkeypatch, io, writer)
    with pytest.raises(KeyboardInterrupt):
        segment_cli.write_outputs(tmp_path, tmp_path / "img.tif", image, result, args)
    assert sorted(tmp_path.iterdir()) == []
    monkeypatch.undo()
    segment_cli.write_outputs(tmp_path, tmp_path / "img.tif", image, result, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_masks.tif", "img_outlines.png", "img_seg.npy"]
