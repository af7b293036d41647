"""train.host_memory: with the loop's mmap threshold, freed activation-sized tensors leave the process's RSS; the
forward-phase threshold applies inside its block only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from train.config import ConfigError, load_config
from train.host_memory import (
    AUTO_MIN_PARAMETERS,
    AUTO_THRESHOLD_MB,
    forward_threshold_mb,
    parse_threshold,
    set_mmap_threshold,
)

CHILD = textwrap.dedent("""
    import sys, torch
    from train.host_memory import set_mmap_threshold
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    if sys.argv[1] == "set":
        assert set_mmap_threshold(1.0)
    first = torch.ones(4 * 2**20)  # 16 MiB, mmapped; freeing it raises glibc's dynamic threshold to 16 MiB
    del first
    base = rss()
    tensors = [torch.ones(2**20) for _ in range(96)]  # 96 x 4 MiB, touched
    small = [torch.ones(1000) for _ in range(96)]
    del tensors[::2]  # free every second one: holes between live chunks
    print(rss() - base)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_tensors_are_returned_to_the_os() -> None:
    held = float(subprocess.run([sys.executable, "-c", CHILD, "set"], capture_output=True, text=True,
                                check=True).stdout)
    # 48 x 4 MiB = 192 MiB are still alive; the 192 MiB freed must not stay resident
    assert 180 < held < 240, held


def test_set_mmap_threshold_refuses_nothing_to_do() -> None:
    assert set_mmap_threshold(0) is False


def test_config_checks_the_threshold() -> None:
    assert load_config(None, []).host_mmap_threshold_mb == "auto"
    assert parse_threshold(load_config(None, ["host_mmap_threshold_mb=0"]).host_mmap_threshold_mb) == 0.0
    assert parse_threshold(load_config(None, ["host_mmap_threshold_mb=2.5"]).host_mmap_threshold_mb) == 2.5
    for bad in ("64", "-1", "big"):
        with pytest.raises(ConfigError, match="host_mmap_threshold_mb"):
            load_config(None, [f"host_mmap_threshold_mb={bad}"])


def test_auto_threshold_is_for_large_models_only() -> None:
    # auto: CP-SAM ViT-L (~300 M parameters) mmaps its forward activations; a CPnet (6.6 M) leaves glibc alone
    assert forward_threshold_mb("auto", 305_000_000) == AUTO_THRESHOLD_MB == 1.0
    assert forward_threshold_mb("auto", AUTO_MIN_PARAMETERS) == 1.0
    assert forward_threshold_mb("auto", AUTO_MIN_PARAMETERS - 1) == 0.0
    assert forward_threshold_mb("auto", 6_600_000) == 0.0
    assert forward_threshold_mb("4", 6_600_000) == 4.0  # a number is used whatever the model
    assert forward_threshold_mb("0", 305_000_000) == 0.0


PHASES = textwrap.dedent("""
    import sys, torch
    from train.host_memory import forward_allocations
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    keep = sys.argv[1] == "keep"
    with forward_allocations(1.0, keep_after=keep):  # a "forward pass": 48 x 4 MiB activations, then freed
        acts = [torch.ones(2**20) for _ in range(48)]
    base = rss()
    del acts
    released = base - rss()
    temps = [torch.ones(2**20) for _ in range(48)]  # a "backward pass": 48 x 4 MiB temporaries, then freed
    pin = torch.ones(2**20)  # a live 4 MiB tensor above them: the heap cannot shrink under it (no trim)
    base = rss()
    del temps
    print(released, base - rss())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.parametrize("keep", ["heap", "keep"])
def test_forward_allocations_only_inside_the_block(keep: str) -> None:
    out = subprocess.run([sys.executable, "-c", PHASES, keep], capture_output=True, text=True, check=True).stdout
    released_forward, released_after = map(float, out.split())
    assert 180 < released_forward < 200, out  # 192 MiB of forward activations returned to the OS
    if keep == "keep":  # the threshold stayed on: the later tensors are returned too
        assert 180 < released_after < 200, out
    else:  # after the block the heap serves 4 MiB tensors again: freed, they stay resident
        assert released_after < 20, out
