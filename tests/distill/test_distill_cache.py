"""Teacher-output cache: views replay exactly from their stored keys (fp16 precision), a killed build resumes,
other settings are refused, and the cached training dataset serves replayed inputs with their stored targets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_cpnet, tiny_cpnet, write_shared_canonical

from cpsam.models import create_model
from distill.cache import (
    CacheError,
    TeacherCache,
    build_cache,
    fp16_tolerance,
    pick_view,
    verify_cache,
    view_sampler,
)
from distill.data import CachedDistillDataset
from distill.teachers import Teacher
from distill.workflow import distill_pipeline
from train.config import KDConfig
from train.data import PipelineSpec, SampleKey, TrainDataset

REAL = [("bact_phase_neurips22", "neurips22_cell_00528"), ("bact_bf_mothermachine_baby", "baby_mmsCMOS_testA")]
TILE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A labelled canonical dataset of two small real images (train split)."""
    return write_shared_canonical(tmp_path_factory.mktemp("canon") / "real",
                                  [(folder, name, "train") for folder, name in REAL])


def _teacher() -> Teacher:
    return Teacher(tiny_cpnet(), "random-cpnet")


def _spec() -> PipelineSpec:
    augment, degrade = distill_pipeline(30.0)
    return PipelineSpec(TILE, 2, augment, degrade)


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    report = build_cache(_teacher(), [str(dataset)], out, spec=_spec(), views=3, seed=5, progress=False)
    assert (report.written, report.skipped) == (6, 0)
    return out


def test_views_replay_from_their_keys_to_fp16_precision(cache, dataset):
    c = TeacherCache(cache)
    teacher = _teacher()
    data = TrainDataset(view_sampler(c.datasets, c.split), c.pipeline_spec(), c.seed)
    for d, i, k in c.all_views():
        stored = c.load_view(d, i, k)
        assert stored["key"] == [5, k, c.ordinal(d, i), d, i]
        x = data.make_sample(c.view_key(d, i, k))["image"][None]  # the input rebuilt from the stored key
        fresh = teacher.teach(x)
        for old, new in ((stored["output"], fresh.output[0]), (stored["features"]["decoder"],
                                                                 fresh.features["decoder"][0])):
            assert old.shape == new.shape
            assert bool(((old - new).abs() <= fp16_tolerance(new)).all())
            # and the stored values are fp16 numbers: most equal the recomputation rounded to fp16
            assert float((old == new.half().float()).float().mean()) > 0.9
    report = verify_cache(c, teacher, 4)
    assert report.n_views == 4 and report.max_ulp_ratio <= 1.0
    assert 0 <= report.max_output_diff < 5e-3 and set(report.max_feature_diff) == {"decoder"}
    # another teacher does not reproduce the cache: verify sees it
    torch.manual_seed(1)
    other = verify_cache(c, Teacher(create_model("cpnet", nbase=[2, 16, 32])), 2)
    assert other.max_ulp_ratio > 100 and other.max_output_diff > 1e-2


def test_distinct_views_differ_and_view_choice_is_a_function_of_the_key(cache):
    c = TeacherCache(cache)
    outs = [c.load_view(0, 0, k)["output"] for k in range(c.views)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    picks = [pick_view(0, 0, p, 3) for p in range(300)]
    assert picks == [pick_view(0, 0, p, 3) for p in range(300)] and set(picks) == {0, 1, 2}


def test_processes_get_disjoint_images_and_together_every_view(cache):
    c = TeacherCache(cache)
    shares = [c.views_of_rank(r, 3) for r in range(3)]
    assert sorted(v for share in shares for v in share) == sorted(c.all_views())
    owners = {(d, i): r for r, share in enumerate(shares) for d, i, _ in share}
    assert all(owners[(d, i)] == r for r, share in enumerate(shares) for d, i, _ in share)  # an image on one rank
    assert [len(s) for s in shares] == [3, 3, 0]


def test_a_killed_build_resumes_and_other_settings_are_refused(cache, dataset, tmp_path):
    c = TeacherCache(cache)
    path = c.view_path(0, 1, 2)
    before = torch.load(path, weights_only=True)
    path.unlink()
    assert c.missing_views() == [(0, 1, 2)]
    report = build_cache(_teacher(), [str(dataset)], cache, spec=_spec(), views=3, seed=5, progress=False)
    assert (report.written, report.skipped) == (1, 5)
    after = torch.load(path, weights_only=True)
    assert after["key"] == before["key"]  # the same view, recomputed (in a batch of 1: other kernels)
    old, new = before["output"].float(), after["output"].float()
    assert bool(((old - new).abs() <= 2 * fp16_tolerance(new)).all())
    with pytest.raises(CacheError, match="other settings"):
        build_cache(_teacher(), [str(dataset)], cache, spec=_spec(), views=4, seed=5, progress=False)
    assert not list(cache.rglob("*.part*"))  # atomic writes leave no temporary file


def test_cached_dataset_serves_the_replayed_crop_and_its_targets(cache):
    c = TeacherCache(cache)
    sampler = view_sampler(c.datasets, c.split)
    base = TrainDataset(sampler, c.pipeline_spec(), c.seed)
    ds = CachedDistillDataset(base, c, KDConfig(), seed=11, feature="decoder")
    key = SampleKey(epoch=4, position=7, dataset_index=0, example_index=1)
    sample = ds[key]
    view = ds.view_of(key)
    stored = c.load_view(0, 1, view)
    assert torch.equal(sample["t_output"], stored["output"])
    assert torch.equal(sample["t_feature"], stored["features"]["decoder"])
    assert torch.equal(sample["image"], base.make_sample(c.view_key(0, 1, view))["image"])
    assert int(sample["epoch"]) == 4 and int(sample["position"]) == 7 and float(sample["brightness"]) == 1.0


def test_a_run_whose_pipeline_differs_from_the_cache_is_refused(cache):
    from train.config import ConfigError, load_config
    from train.objective import objective_for
    from train.sampler import MultiDatasetSampler

    c = TeacherCache(cache)
    cfg = load_config(None, ["objective=distill", f"kd.cache={cache}"])
    objective = objective_for(cfg)
    assert objective.teacher_specs == ["random-cpnet"]  # from the manifest
    sampler = MultiDatasetSampler(c.datasets, samples_per_epoch=4, split="train")
    spec = c.pipeline_spec()
    assert objective.dataset(sampler, replace(spec, channels=1), 0, 0) is not None  # the student's channels: fine
    with pytest.raises(ConfigError, match=r"augment\.scale_range"):
        objective.dataset(sampler, replace(spec, augment=replace(spec.augment, scale_range=1.0)), 0, 0)
    with pytest.raises(ConfigError, match="data.tile_size"):
        objective.dataset(sampler, replace(spec, tile_size=96), 0, 0)


def test_cache_command_builds_verifies_and_a_student_trains_from_it(dataset, tmp_path, capsys):
    from cpsam.cli import main as cpsam_main

    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    cache = tmp_path / "cache"
    argv = ["distill", "cache", "--teacher", str(teacher), "--images", str(dataset), "--out", str(cache), "--views",
            "2", "--verify", "3", "--quiet", "data.tile_size=64"]
    assert cpsam_main(argv) == 0
    out = capsys.readouterr().out
    assert "4 views written, 0 already there" in out and "verified 3 cached views" in out
    ratio = float(out.split("; ")[-1].split(" x fp16")[0])
    assert ratio <= 1.0
    assert cpsam_main(argv) == 0 and "0 views written, 4 already there" in capsys.readouterr().out  # resumed
    run = tmp_path / "run"  # no --teacher: the cache's; the crops: the cache's (64 px, its augmentation)
    assert cpsam_main(["distill", "--student", "cpnet-1-32", "--out", str(run), f"kd.cache={cache}", "--quiet",
                       "--size-epochs", "0", "batch_size=2", "schedule.samples_per_epoch=2", "schedule.epochs=1",
                       "data.num_workers=0", "log.tensorboard=false"]) == 0
    cfg = (run / "config.yaml").read_text()
    assert "tile_size: 64" in cfg and f"cache: {cache}" in cfg and str(teacher) in cfg
    assert (run / "model.pt").is_file()


def test_auto_views_follow_the_pool_size():
    """`--views auto`: 32 views per image for the measured pools (18 H&E, 33 mixed training images), about 1,200
    views in all for larger pools (the default recipe draws each about 8 times), never below 4."""
    from distill.workflow import AUTO_VIEW_DRAWS, DEFAULT_RECIPE_SAMPLES, default_views

    assert DEFAULT_RECIPE_SAMPLES == 100 * 96 and AUTO_VIEW_DRAWS == 8
    assert [default_views(n) for n in (0, 1, 2, 19, 33, 38)] == [32] * 6
    assert [default_views(n) for n in (39, 60, 100, 299, 300, 5000)] == [31, 20, 12, 5, 4, 4]
    for n in (39, 60, 100, 299):
        assert 1200 <= n * default_views(n) < 1200 + n  # the total is ceil-rounded up from 1,200 views
        assert DEFAULT_RECIPE_SAMPLES / (n * default_views(n)) <= AUTO_VIEW_DRAWS


def test_cache_command_views_auto_is_the_default(dataset, tmp_path, monkeypatch, capsys):
    """Without --views the command asks `default_views` with the number of training images it labelled or read
    and caches that many views per image (the rule is patched to 2 views to keep the test small)."""
    import distill.workflow
    from cpsam.cli import main as cpsam_main

    asked: list[int] = []
    monkeypatch.setattr(distill.workflow, "default_views", lambda n: asked.append(n) or 2)
    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    cache = tmp_path / "cache"
    assert cpsam_main(["distill", "cache", "--teacher", str(teacher), "--images", str(dataset), "--out", str(cache),
                       "--quiet", "data.tile_size=64"]) == 0
    captured = capsys.readouterr()
    assert asked == [2]  # the two training images of the fixture
    assert "--views auto: 2 views per image (for 2 training images)" in captured.err
    assert "4 views written" in captured.out and TeacherCache(cache).views == 2
    # a cache built with an explicit count resumes under auto with that count, without asking the rule
    explicit = tmp_path / "explicit"
    argv = ["distill", "cache", "--teacher", str(teacher), "--images", str(dataset), "--out", str(explicit),
            "--quiet", "data.tile_size=64"]
    assert cpsam_main([*argv, "--views", "1"]) == 0 and "2 views written" in capsys.readouterr().out
    assert cpsam_main(argv) == 0
    captured = capsys.readouterr()
    assert asked == [2] and "--views auto: 1 views per image (the cache's own)" in captured.err
    assert "0 views written, 2 already there" in captured.out


def test_views_option_takes_auto_or_a_positive_integer():
    import argparse

    from cpsam.cli_types import positive_int_or_auto

    assert positive_int_or_auto("auto") == "auto" and positive_int_or_auto("AUTO") == "auto"
    assert positive_int_or_auto("7") == 7
    for bad in ("0", "-3", "2.5", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int_or_auto(bad)


def test_two_real_processes_share_the_cache_build(dataset, tmp_path):
    """`torchrun --nproc_per_node 2 -m cpsam distill cache` (gloo, two CPU processes): each rank writes the views
    of its own images, together every view, equal to a one-process build (to an fp16 ulp). Before
    `train.loop.runs_on_cpu` was passed to PartialState, both processes ran as rank 0 of 1 and wrote every view."""
    import os
    import subprocess
    import sys

    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    args = ["distill", "cache", "--teacher", str(teacher), "--images", str(dataset), "--views", "2", "--quiet",
            "data.tile_size=64"]
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"cache{nproc}"
        launcher = [sys.executable, "-m", "cpsam"] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29600 + os.getpid() % 1000), "-m", "cpsam"]
        done = subprocess.run([*launcher, *args, "--out", str(out)], env=env, cwd=repo, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        outputs[nproc] = (out, done.stdout)
    log = outputs[2][1]
    # two ranks, two images: one image (2 views) each
    assert "rank 0: 2 views written" in log and "rank 1: 2 views written" in log, log
    assert "rank 0: 4 views written" in outputs[1][1]
    single, double = TeacherCache(outputs[1][0]), TeacherCache(outputs[2][0])
    assert single.all_views() == double.all_views() and len(single.all_views()) == 4
    for view in single.all_views():
        a, b = single.load_view(*view)["output"].float(), double.load_view(*view)["output"].float()
        assert a.abs().max() > 0
        # the two builds batch the views differently (4 vs 2 per forward): float rounding may flip an fp16 ulp
        torch.testing.assert_close(b, a, rtol=2 ** -10, atol=1e-4, msg=str(view))


def test_a_half_scale_student_sees_area_averaged_crops_and_targets(cache, tmp_path, capsys):
    """kd.student_scale=0.5: the student's input and the teacher's outputs are the cached ones averaged over 2x2
    blocks, its feature map is adapted up to the teacher's, the loss trains, and `cpsam distill` records the
    halved diam_mean in model.pt (what makes `cpsam segment` shrink images for it)."""
    from cpsam.cli import main as cpsam_main
    from cpsam.models.loading import load_model
    from distill.data import stack_crops
    from train.config import ConfigError, load_config
    from train.objective import objective_for
    from train.sampler import MultiDatasetSampler

    c = TeacherCache(cache)
    sampler = MultiDatasetSampler(c.datasets, samples_per_epoch=4, split="train")
    with pytest.raises(ConfigError, match=r"model.diam_mean must be 15"):  # a student run at the wrong scale
        objective_for(load_config(None, ["objective=distill", f"kd.cache={cache}", "kd.student_scale=0.5",
                                         "model.diam_mean=30"])).dataset(sampler, c.pipeline_spec(), 0, 0)
    cfg = load_config(None, ["objective=distill", f"kd.cache={cache}", "kd.student_scale=0.5", "model.diam_mean=15",
                             "kd.gt_weight=1"])
    objective = objective_for(cfg)
    data = objective.dataset(sampler, c.pipeline_spec(), 0, 0)
    torch.manual_seed(0)
    net = create_model("cpnet", nbase=[1, 16, 32], diam_mean=15.0)
    aux = objective.aux_modules(net)
    assert objective.student_size == TILE // 2
    assert aux["adapter"].student_shape == (16, TILE // 2, TILE // 2) and aux["adapter"].teacher_shape == (16, TILE,
                                                                                                            TILE)
    keys = [SampleKey(0, p, 0, p % 2) for p in range(3)]
    raw = stack_crops(data, keys)
    batch = objective.prepare_batch({k: v.clone() for k, v in raw.items()}, torch.device("cpu"))

    def blocks(x: torch.Tensor) -> torch.Tensor:  # the mean of each 2x2 block, by hand
        return x.reshape(*x.shape[:-2], TILE // 2, 2, TILE // 2, 2).mean(dim=(-3, -1))

    assert torch.allclose(batch["student_image"], blocks(raw["image"][:, :1]), atol=1e-6)
    assert torch.allclose(batch["t_output"], blocks(raw["t_output"].float()), atol=1e-5)
    assert torch.allclose(batch["target"], blocks(raw["target"]), atol=1e-6)
    assert tuple(batch["valid"].shape) == (3, TILE // 2, TILE // 2)
    assert tuple(batch["t_feature"].shape) == tuple(raw["t_feature"].shape)  # the adapter resizes the student's map
    loss, parts = objective.loss(net, aux, batch)
    loss.backward()
    assert torch.isfinite(loss.detach())
    assert float(parts["kd_feature"].detach()) > 0 and float(parts["gt_flow"].detach()) > 0
    assert net.output[-1].weight.grad.abs().sum() > 0 and aux["adapter"].proj is None  # 16 = 16 channels

    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    loadable = tmp_path / "cache"
    assert cpsam_main(["distill", "cache", "--teacher", str(teacher), "--images", str(c.datasets[0]), "--out",
                       str(loadable), "--views", "1", "--quiet", "data.tile_size=64"]) == 0
    run = tmp_path / "half"
    assert cpsam_main(["distill", "--student", "cpnet-1-32-64", "--out", str(run), f"kd.cache={loadable}", "--quiet",
                       "--size-epochs", "1", "batch_size=2", "schedule.samples_per_epoch=2", "schedule.epochs=1",
                       "data.num_workers=0", "log.tensorboard=false", "kd.student_scale=0.5"]) == 0
    assert float(load_model(run / "model.pt").diam_mean) == pytest.approx(15.0)
    assert (run / "model.pt_size.npy").is_file()


def _flip(x: torch.Tensor, flip_y: bool, flip_x: bool, flows: bool = False) -> torch.Tensor:
    """x (B, C, H, W) mirrored along Y and/or X; `flows`: also negate dY / dX (channels 0 / 1) along the flips."""
    dims = [d for d, f in ((-2, flip_y), (-1, flip_x)) if f]
    out = torch.flip(x, dims)
    if flows:
        out = out.clone()
        if flip_y:
            out[:, 0] = -out[:, 0]
        if flip_x:
            out[:, 1] = -out[:, 1]
    return out


def test_the_augmented_teacher_is_flip_equivariant_by_construction():
    """A random CPnet is not flip-equivariant; averaged over the four flips it is: teaching the mirrored crop gives
    the mirrored output (flows sign-corrected) and mirrored features, to float rounding."""
    torch.manual_seed(3)
    x = torch.randn(2, 2, TILE, TILE)
    plain, augmented = _teacher(), Teacher(tiny_cpnet(), "random-cpnet", augment=True)
    for flip_y, flip_x in ((False, True), (True, False), (True, True)):
        raw, raw_flipped = plain.teach(x), plain.teach(_flip(x, flip_y, flip_x))
        assert (_flip(raw.output, flip_y, flip_x, flows=True) - raw_flipped.output).abs().max() > 1e-3
        out, out_flipped = augmented.teach(x), augmented.teach(_flip(x, flip_y, flip_x))
        scale = float(out.output.abs().max())
        assert (_flip(out.output, flip_y, flip_x, flows=True) - out_flipped.output).abs().max() <= 1e-5 * scale
        feat, feat_flipped = out.features["decoder"], out_flipped.features["decoder"]
        assert (_flip(feat, flip_y, flip_x) - feat_flipped).abs().max() <= 1e-5 * float(feat.abs().max())
    # it is the mean of the four un-flipped passes (the rule of `cpsam segment --augment`)
    passes = [_flip(plain.teach(_flip(x, fy, fx)).output, fy, fx, flows=True)
              for fy, fx in ((False, False), (False, True), (True, False), (True, True))]
    assert torch.allclose(augmented.teach(x).output, torch.stack(passes).mean(0), atol=1e-6)


def test_the_cache_records_an_augmented_teacher_and_a_resume_must_match(dataset, tmp_path):
    out = tmp_path / "aug"
    augmented = Teacher(tiny_cpnet(), "random-cpnet", augment=True)
    build_cache(augmented, [str(dataset)], out, spec=_spec(), views=1, seed=5, progress=False)
    c = TeacherCache(out)
    assert c.teacher_augment and c.manifest["teacher_augment"] is True
    assert verify_cache(c, augmented, 2).max_ulp_ratio <= 1.0  # the stored targets are the augmented teacher's
    with pytest.raises(CacheError, match="built with --teacher-augment") as err:
        build_cache(_teacher(), [str(dataset)], out, spec=_spec(), views=1, seed=5, progress=False)
    assert len(str(err.value).splitlines()) == 1
    # the online objective follows the cache; asking for an augmented teacher with a plain cache is refused
    from train.config import load_config
    from train.objective import objective_for

    assert objective_for(load_config(None, ["objective=distill", f"kd.cache={out}"])).teacher_augment


def test_an_augmented_run_cannot_train_from_a_plain_cache(cache):
    from train.config import ConfigError, load_config
    from train.objective import objective_for

    assert not TeacherCache(cache).teacher_augment  # built before: a plain teacher, no teacher_augment needed
    with pytest.raises(ConfigError, match="plain teacher"):
        objective_for(load_config(None, ["objective=distill", f"kd.cache={cache}", "kd.teacher_augment=true"]))


def test_cache_command_refuses_a_resume_with_the_other_setting_in_one_line(dataset, tmp_path):
    from conftest import cli, line_with, no_traceback

    teacher = save_tiny_cpnet(tmp_path / "teacher.pt")
    argv = ["distill", "cache", "--teacher", teacher, "--images", dataset, "--out", tmp_path / "c", "--views", "1",
            "--quiet", "data.tile_size=64"]
    code, out, err = cli(*argv, "--teacher-augment")
    assert code == 0, err
    assert TeacherCache(tmp_path / "c").teacher_augment
    code, out, err = cli(*argv)
    assert code == 2 and line_with(err, "built with --teacher-augment", "rerun with it")
    no_traceback(err)
