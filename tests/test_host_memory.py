"""train.host_memory: with the loop's mmap threshold, freed activation-sized tensors leave the process's RSS; the
forward-phase threshold applies inside its block only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from train.config import ConfigError, load_config
from train.host_memory import set_mmap_threshold

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
    assert load_config(None, []).host_mmap_threshold_mb == 1.0
    assert load_config(None, ["host_mmap_threshold_mb=0"]).host_mmap_threshold_mb == 0.0
    with pytest.raises(ConfigError, match="host_mmap_threshold_mb"):
        load_config(None, ["host_mmap_threshold_mb=64"])


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
