"""`cpsam segment` over many processes (torchrun, accelerate launch): the balanced split, summary.csv, byte
identity with one process, and a SIGKILLed rank resumed with --skip-existing."""

from __future__ import annotations

import csv
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import tifffile
import torch
from conftest import REPO_ROOT, free_port, line_with, no_temp_files, shared_path

from cpsam import io
from cpsam.metrics import score_image
from cpsam.segment_cli import OUTPUT_FILES
from cpsam.segment_files import segment_files
from cpsam.segment_summary import COLUMNS, SummaryRow, merge_rows, read_summary, write_summary
from cpsam.shard import RankContext, balanced_shares, image_pixels, shard_files
from distill.evaluate import EvalImage, Evaluation, merge_evaluations

HELA = "fluo_nuclei_ctc_N2DL-HeLa"
# (height, width) crops of the four HeLa images: six small images of unequal size, about 3 s each with cyto_0
CROPS = [(96, 128), (160, 160), (128, 256), (200, 120), (144, 144), (256, 200)]


# --------------------------------------------------------------------------- the split (unit)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_balanced_shares_are_disjoint_complete_balanced_and_deterministic(world: int) -> None:
    rng = np.random.default_rng(world)
    weights = [int(w) for w in rng.integers(1, 10_000, 101)]
    shares = balanced_shares(weights, world)
    assert len(shares) == world
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(len(weights)))  # complete and disjoint
    assert all(share == sorted(share) for share in shares)  # each share keeps the list order
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - sum(weights) / world <= max(weights)  # the greedy rule's bound
    assert max(loads) / (sum(weights) / world) < 1.05  # 101 items: near-perfect balance
    assert balanced_shares(weights, world) == shares
    assert balanced_shares(list(weights), world) == shares


def test_balanced_shares_edge_cases() -> None:
    assert balanced_shares([], 3) == [[], [], []]
    assert balanced_shares([5], 2) == [[0], []]
    assert balanced_shares([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]  # ties: lowest rank, list order
    assert balanced_shares([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [[0], list(range(1, 11))]
    with pytest.raises(ValueError, match="world_size"):
        balanced_shares([1], 0)


def test_image_pixels_reads_headers(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((2, 30, 40), np.uint16))
    np.save(tmp_path / "b.npy", np.zeros((50, 60), np.float32))
    cv2.imwrite(str(tmp_path / "c.png"), np.zeros((70, 80, 3), np.uint8))
    (tmp_path / "d.tif").write_bytes(b"not a tiff at all")
    assert image_pixels(tmp_path / "a.tif") == 2 * 30 * 40
    assert image_pixels(tmp_path / "b.npy") == 50 * 60
    assert image_pixels(tmp_path / "c.png") == 70 * 80 * 3
    assert image_pixels(tmp_path / "d.tif") == len(b"not a tiff at all")  # unreadable: its size in bytes
    assert image_pixels(tmp_path / "missing.tif") == 0
    files = sorted(tmp_path.iterdir())
    shares = shard_files(files, 2)
    # c (16800) alone outweighs the rest (3000 + 2400 + 17)
    assert shares == [[tmp_path / "c.png"], [tmp_path / "a.tif", tmp_path / "b.npy", tmp_path / "d.tif"]]


def test_rank_context_from_env_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert RankContext.from_env() == RankContext(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = RankContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.distributed) == (3, 4, 1, False, True)
    assert ctx.device(torch.device("cuda")) == torch.device("cuda", 1)  # one GPU per rank of a machine
    assert ctx.device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert ctx.device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 of world size 4"):
        RankContext.from_env()


def test_an_existing_nccl_group_gets_each_ranks_own_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reusing a script's NCCL group: the object collectives run on the current CUDA device, which must be
    cuda:LOCAL_RANK (not cuda:0 on every rank); the group is left running."""
    import torch.distributed as dist

    from cpsam import shard

    current: list[torch.device] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "destroy_process_group", lambda: pytest.fail("the script's group was stopped"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with shard.process_group(RankContext(rank=3, world_size=4, local_rank=1)):
        pass
    assert current == [torch.device("cuda", 1)]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    with shard.process_group(RankContext(rank=3, world_size=4, local_rank=1)):
        pass
    assert current == [torch.device("cuda", 1)]


def test_summary_rows_round_trip_and_refuse_duplicates(tmp_path: Path) -> None:
    rows = [SummaryRow("b.tif", "ok", 12, 17.0, 1.25, 1), SummaryRow("a.tif", "failed", seconds=0.5, rank=0),
            SummaryRow("c.tif", "skipped-existing")]
    path = write_summary(tmp_path, rows)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_summary(path) == sorted(rows, key=lambda r: r.file)
    no_temp_files(tmp_path)
    with pytest.raises(ValueError, match=r"a.tif has two summary rows \(ranks 0 and 1\)"):
        merge_rows([rows, [SummaryRow("a.tif", "ok", rank=1)]])
    with pytest.raises(ValueError, match="status must be one of"):
        SummaryRow("x.tif", "done")


# --------------------------------------------------------------------------- real multi-process runs


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IN/crop0..5.tif: crops of unequal size from the four real HeLa nuclei images."""
    folder = tmp_path_factory.mktemp("crops") / "in"
    folder.mkdir()
    sources = sorted(shared_path("data", HELA).glob("*_img.tif"))
    assert len(sources) == 4
    for k, (h, w) in enumerate(CROPS):
        image = tifffile.imread(sources[k % 4])
        tifffile.imwrite(folder / f"crop{k}.tif", image[37 * k : 37 * k + h, 53 * k : 53 * k + w])
    return folder


def _env() -> dict[str, str]:
    # torchrun and accelerate give each CPU rank OMP_NUM_THREADS=1; CPU kernels round differently with the thread
    # count, so the one-process reference runs with one thread too
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _segment_cmd(launcher: list[str], model: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [*launcher, "-m", "cpsam", "segment", "--model", str(model), "--input", str(inputs), "--output", str(out),
            "--diameter", "17", "--device", "cpu", *extra]


def _torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.fixture(scope="module")
def reference(crops: Path, tmp_path_factory: pytest.TempPathFactory, cyto0_file: Path) -> Path:
    """The one-process run over the crops (its OUT folder)."""
    out = tmp_path_factory.mktemp("one") / "out"
    proc = subprocess.run(_segment_cmd([sys.executable], cyto0_file, crops, out), env=_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _same_outputs(out: Path, reference: Path, crops: Path) -> None:
    """Every image's three outputs exist in `out` and equal the reference byte for byte; nothing else but
    summary.csv; no temporary file."""
    names = sorted(f"{p.stem}{suffix}" for p in crops.iterdir() for suffix in OUTPUT_FILES)
    assert sorted(n for n in os.listdir(out) if n != "summary.csv") == names
    for name in names:
        assert filecmp.cmp(out / name, reference / name, shallow=False), name
    no_temp_files(out)


RANK_MODEL_SCRIPT = """
import os, sys
from cpsam.segment_files import SegmentFilesError, segment_files
model = sys.argv[1] if os.environ["RANK"] == "0" else sys.argv[2]
try:
    segment_files(model, sys.argv[3], sys.argv[4], diameter=17, device="cpu")
except SegmentFilesError as exc:
    sys.exit(exc.code)
"""


def test_a_rank_that_cannot_load_the_model_stops_every_rank(crops: Path, cyto0_file: Path, tmp_path: Path) -> None:
    """Rank 1's model file is broken, rank 0's is fine: both stop at once (exit 2) with one line each, before any
    image is written, instead of rank 0 segmenting its share and waiting for rank 1 at the final gather."""
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "script.py").write_text(RANK_MODEL_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run([*_torchrun(free_port()), str(tmp_path / "script.py"), str(cyto0_file),
                           str(tmp_path / "broken.pt"), str(crops), str(out)], env=_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "broken.pt" in line_with(proc.stderr, "cpsam segment: cannot load the model"), proc.stderr
    line_with(proc.stderr, "cpsam segment: rank 1 cannot load the model", "every rank stops")
    assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith("_masks.tif")]


def test_one_process_writes_a_summary(reference: Path, crops: Path) -> None:
    rows = read_summary(reference / "summary.csv")
    assert [r.file for r in rows] == sorted(p.name for p in crops.iterdir())
    assert {r.status for r in rows} == {"ok"} and {r.rank for r in rows} == {0} and {r.diameter for r in rows} == {17.0}
    for row in rows:
        assert row.cells == int(io.read_labels(reference / f"{Path(row.file).stem}_masks.tif").max())
        assert row.seconds is not None and row.seconds > 0
    assert sum(r.cells for r in rows) > 20  # real nuclei were found


def test_torchrun_two_ranks_equal_one_process(reference: Path, crops: Path, cyto0_file: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(_segment_cmd(_torchrun(free_port()), cyto0_file, crops, out), env=_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _same_outputs(out, reference, crops)
    rows = read_summary(out / "summary.csv")
    assert [r.file for r in rows] == sorted(p.name for p in crops.iterdir())  # each image once
    files = sorted(crops.iterdir())
    expected_rank = {p.name: r for r, share in enumerate(shard_files(files, 2)) for p in share}
    assert {r.file: r.rank for r in rows} == expected_rank and set(expected_rank.values()) == {0, 1}
    one = {r.file: r for r in read_summary(reference / "summary.csv")}
    assert all(r.status == "ok" and (r.cells, r.diameter) == (one[r.file].cells, one[r.file].diameter) for r in rows)
    assert "2 processes, 6 images to segment" in proc.stderr
    assert proc.stdout.count("cpsam segment: 6 images,") == 1  # rank 0 prints the totals of all ranks


def _workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's worker processes by RANK."""
    workers = {}
    for child in launcher.children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "cpsam" in " ".join(child.cmdline()):
            workers[int(env["RANK"])] = child
    return workers


def test_sigkill_of_one_rank_then_resume_with_skip_existing(reference: Path, crops: Path, cyto0_file: Path,
                                                            tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed once the first image is written; the launcher stops rank 0 (SIGTERM, it cleans up).
    No final name is ever half-written; the rerun (accelerate launch, 2 processes) completes the set exactly."""
    out = tmp_path / "out"
    launcher = subprocess.Popen(_segment_cmd(_torchrun(free_port()), cyto0_file, crops, out), env=_env(), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.name.endswith("_outlines.png") for p in out.iterdir())):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.02)
    workers = _workers(psutil.Process(launcher.pid))
    assert sorted(workers) == [0, 1]
    workers[1].send_signal(signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, stderr
    assert not (out / "summary.csv").exists()
    complete = {p.name[: -len("_outlines.png")] for p in out.iterdir() if p.name.endswith("_outlines.png")}
    assert 1 <= len(complete) < len(CROPS)
    for stem in complete:  # what was finished is final and right
        for suffix in OUTPUT_FILES:
            assert filecmp.cmp(out / f"{stem}{suffix}", reference / f"{stem}{suffix}", shallow=False)

    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    proc = subprocess.run(_segment_cmd(accelerate, cyto0_file, crops, out, "--skip-existing"),
                          env={**_env(), "ACCELERATE_USE_CPU": "1"}, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    _same_outputs(out, reference, crops)
    rows = read_summary(out / "summary.csv")
    assert [r.file for r in rows] == sorted(p.name for p in crops.iterdir())
    skipped = {r.file for r in rows if r.status == "skipped-existing"}
    assert skipped == {f"{stem}.tif" for stem in complete}
    assert {r.status for r in rows if r.file not in skipped} == {"ok"}
    assert {r.rank for r in rows if r.status == "ok"} <= {0, 1}


def test_segment_files_split_without_a_group_equals_one_process(reference: Path, crops: Path, cyto0_file: Path,
                                                                tmp_path: Path) -> None:
    """The Python API as two tasks of a job array (rank 0 then rank 1 of 2, no torch.distributed): each does
    its share only, writes no summary.csv, and the merged rows and outputs equal the one-process run."""
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference (one thread per process)
    try:
        parts = [segment_files(cyto0_file, crops, out, rank=r, world_size=2, diameter=17.0, device="cpu")
                 for r in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    files = sorted(crops.iterdir())
    assert [[r.file for r in part] for part in parts] == [[p.name for p in s] for s in shard_files(files, 2)]
    assert all(r.rank == k and r.status == "ok" for k, part in enumerate(parts) for r in part)
    assert not (out / "summary.csv").exists()
    write_summary(out, [r for part in parts for r in part])
    _same_outputs(out, reference, crops)
    with pytest.raises(ValueError, match="unknown option 'diameters'"):
        segment_files(cyto0_file, crops, out, diameters=17)
    with pytest.raises(ValueError, match="both rank and world_size"):
        segment_files(cyto0_file, crops, out, rank=1)
    with pytest.raises(ValueError, match="segment_blockwise"):  # never silently segmented as a folder
        segment_files(cyto0_file, crops, out, blockwise=True, block_size=2048)


@pytest.mark.slow  # 50-95 s on the shared 2-core machine (two runs, median diameters from the masks)
def test_eval_paper_on_two_ranks_equals_one_process(cyto0_file: Path, tmp_path: Path) -> None:
    """`cpsam eval paper` shares the split: 2 torchrun ranks write the per-image table of one process."""
    data = tmp_path / "hela"
    data.mkdir()
    for k, image_path in enumerate(sorted(shared_path("data", HELA).glob("*_img.tif"))):
        h, w = CROPS[k]
        crop = (slice(40 * k, 40 * k + h), slice(60 * k, 60 * k + w))
        tifffile.imwrite(data / f"c{k}_img.tif", tifffile.imread(image_path)[crop])
        masks = tifffile.imread(image_path.with_name(image_path.name.replace("_img", "_masks")))[crop]
        io.write_labels(data / f"c{k}_masks.tif", masks)
    tables = []
    for launcher, out in (([sys.executable], tmp_path / "one"), (_torchrun(free_port()), tmp_path / "two")):
        cmd = [*launcher, "-m", "cpsam", "eval", "paper", "--model", str(cyto0_file), "--data", str(data),
               "--out", str(out), "--quiet"]
        proc = subprocess.run(cmd, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        tables.append((out / "paper_images.csv").read_text())
        assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    assert tables[0] == tables[1]
    assert len(tables[0].splitlines()) == 1 + 4


def test_distill_eval_merge_restores_the_one_process_order() -> None:
    """`cpsam distill eval` on N ranks: merging the ranks' Evaluations gives the one-process order."""
    items = [EvalImage("d", f"i{k}", Path(f"i{k}.tif")) for k in range(5)]
    truth = np.zeros((8, 8), np.uint16)
    truth[2:6, 2:6] = 1

    def part(indices: list[int]) -> Evaluation:
        ev = Evaluation(seconds={"s": [0.1 * k for k in indices]}, problems=[f"p{k}" for k in indices if k == 3])
        for k in indices:
            for model in ("s", "s2"):
                pred = np.roll(truth, k, axis=1)
                scores = score_image(truth, pred)
                ev.rows.append({"dataset": "d", "name": f"i{k}", "model": model, "reference": "teacher", "k": k})
                ev.results.setdefault((model, "teacher"), []).append(("d", scores))
        return ev

    one = part([0, 1, 2, 3, 4])
    merged = merge_evaluations(items, [part([1, 3]), part([0, 2, 4])])
    assert merged.rows == one.rows
    for key in one.results:
        assert [s.as_row() for _, s in merged.results[key]] == [s.as_row() for _, s in one.results[key]]
    assert sorted(merged.seconds["s"]) == sorted(one.seconds["s"]) and merged.problems == ["p3"]


@pytest.mark.slow  # about 2 minutes on the shared 2-core machine (two runs of teacher + student + mirror)
def test_distill_eval_on_two_ranks_equals_one_process(crops: Path, cyto0_file: Path, tmp_path: Path) -> None:
    """`cpsam distill eval` on 2 torchrun ranks writes the one-process per-image and summary tables (seconds
    aside: each rank times its own share)."""
    tables = []
    for launcher, out in (([sys.executable], tmp_path / "one"), (_torchrun(free_port()), tmp_path / "two")):
        cmd = [*launcher, "-m", "cpsam", "distill", "eval", "--teacher", str(cyto0_file), "--student",
               str(cyto0_file), "--images", str(crops), "--out", str(out), "--diameter", "17", "--quiet",
               "--device", "cpu"]
        proc = subprocess.run(cmd, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count(f"{len(CROPS)} images -> {out}") == 1  # rank 0 alone reports
        tables.append([[{k: v for k, v in row.items() if not k.startswith("seconds")}
                        for row in csv.DictReader((out / name).open())] for name in ("per_image.csv", "summary.csv")])
    assert tables[0] == tables[1]
    assert len(tables[0][0]) == 2 * len(CROPS)  # student and teacher-mirrored per image
