"""CP-SAM as the teacher: cpsam_tiny online with a CPnet student through the feature adapter (trained and
checkpointed by the loop), and ViT-L at full shape with random weights: one cache entry and distillation steps
from it (slow on a CPU: one 256-px view)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_shared_canonical

from cpsam.models import create_model, save_checkpoint
from distill.cache import TeacherCache, build_cache
from distill.losses import FeatureAdapter
from distill.objective import adapter_seed
from distill.teachers import Teacher
from distill.workflow import distill_pipeline
from train.config import TrainConfig
from train.data import PipelineSpec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A labelled canonical dataset of one small real image (200 x 200 bacteria, 44 cells), train split."""
    return write_shared_canonical(tmp_path_factory.mktemp("canon") / "bact",
                                  [("bact_phase_neurips22", "neurips22_cell_00528", "train")], dataset="bact",
                                  names=["cell_00528"])


def _config(run: Path, data: Path, tile: int, student: str, **kd) -> TrainConfig:
    augment, degrade = distill_pipeline(30.0)
    cfg = TrainConfig(objective="distill", output_dir=str(run), batch_size=2, max_steps=2, augment=augment,
                      degrade=degrade)
    cfg.model.name = student
    cfg.data.train, cfg.data.tile_size, cfg.data.num_workers, cfg.data.min_train_masks = [str(data)], tile, 0, 1
    cfg.schedule.epochs, cfg.schedule.samples_per_epoch, cfg.schedule.kind = 1, 4, "constant"
    cfg.optim.lr = 1e-3
    cfg.log.tensorboard = cfg.log.progress = False
    cfg.val.every_epochs = 0
    for key, value in kd.items():
        setattr(cfg.kd, key, value)
    return cfg


def test_cpsam_tiny_teacher_trains_a_cpnet_student_through_the_feature_adapter(dataset, tmp_path):
    from train.loop import train

    torch.manual_seed(0)
    teacher_file = save_checkpoint(tmp_path / "tiny.pt", create_model("cpsam_tiny", tile_size=128))
    cfg = _config(tmp_path / "run", dataset, 128, "cpnet", teacher=[str(teacher_file)], val_crops=0)
    cfg.model.nbase = [1, 32, 64]
    result = train(cfg)
    assert result.step == 2
    state = torch.load(tmp_path / "run" / "checkpoints" / "last" / "state.pt", weights_only=False)
    # neck (32, 16, 16) <- student encoder level 1 (64, 64, 64): a 1x1 conv 64 -> 32 and a 4x area resize
    assert tuple(state["aux"]["adapter.proj.weight"].shape) == (32, 64, 1, 1)
    torch.manual_seed(adapter_seed(cfg.seed))  # the adapter's initialisation, rebuilt
    initial = FeatureAdapter((64, 64, 64), (32, 16, 16)).proj.weight
    assert not torch.allclose(initial, state["aux"]["adapter.proj.weight"])  # trained with the network
    assert "adapter.proj.weight" not in torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("kd_feature")]) > 0 and float(last[header.index("kd_flow")]) > 0


@pytest.mark.slow
def test_vit_l_teacher_with_random_weights_caches_a_view_and_distills_from_it(dataset, tmp_path):
    from train.loop import train

    torch.manual_seed(0)
    teacher = Teacher(create_model("cpsam_vit_l"), "random-vit-l")
    augment, degrade = distill_pipeline(30.0)
    report = build_cache(teacher, [str(dataset)], tmp_path / "cache", spec=PipelineSpec(256, 3, augment, degrade),
                         views=1, progress=False)
    assert report.written == 1
    cache = TeacherCache(tmp_path / "cache")
    view = cache.load_view(0, 0, 0)
    assert tuple(view["output"].shape) == (3, 256, 256) and tuple(view["features"]["neck"].shape) == (256, 32, 32)
    del teacher
    cfg = _config(tmp_path / "run", dataset, 256, "cpnet-1-32-64-128-256", cache=str(tmp_path / "cache"),
                  val_crops=0)
    result = train(cfg)
    assert result.step == 2
    state = torch.load(tmp_path / "run" / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert state["aux"] == {}  # the neck (256 x 32 x 32) is the student's deepest map's shape: identity adapter
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("kd_feature")]) > 0
