"""The layer seams: `cpsam.models.resolve_model` raises one typed error, objectives are found as plug-ins."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cpsam.models import ModelSpecError, create_model, resolve_model, save_checkpoint
from train.config import ConfigError, load_config
from train.objective import ENTRY_POINT_GROUP, Objective, declared_objectives, objective_for, register_objective


def test_unknown_spec_names_the_spec_and_the_known_models(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"'no_such_model' is neither a file nor a pretrained name \(.*cyto_0"
                       ) as info:
        resolve_model("no_such_model")
    assert info.value.spec == "no_such_model" and isinstance(info.value, ValueError)


def test_a_folder_without_model_pt_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=str(tmp_path)) as info:
        resolve_model(str(tmp_path))
    assert info.value.spec == str(tmp_path)


def test_an_unreadable_file_is_a_spec_error_with_the_loader_message(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelSpecError, match=str(bad)) as info:
        resolve_model(str(tmp_path))  # a run folder: its model.pt
    assert info.value.spec == str(tmp_path) and info.value.__cause__ is not None


def test_a_binary_family_model_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "bin.pt", create_model("resnet10t_unet", in_chans=1, decoder_div=8))
    with pytest.raises(ModelSpecError, match="not a flow model; segment with `cpsam binary predict`"):
        resolve_model(str(path))


def test_a_run_folder_gives_its_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", create_model("cpnet", nbase=[2, 8, 16], nout=3))
    model = resolve_model(str(tmp_path), "cpu")
    assert hasattr(model, "diam_mean") and model.size_model is None


def test_objectives_are_declared_as_entry_points_not_named_by_train() -> None:
    declared = declared_objectives()
    assert declared["distill"].value == "distill.objective:DistillObjective"
    assert all(ep.group == ENTRY_POINT_GROUP for ep in declared.values())
    tree = ast.parse(Path(__file__).parents[1].joinpath("train", "objective.py").read_text())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [s for s in strings if "distill." in s and s != ast.get_docstring(tree, clean=False)]
    obj = objective_for(load_config(None, ["objective=distill", "kd.teacher=[cyto_0]"]))
    assert type(obj).__module__ == "distill.objective"


def test_register_objective_as_a_decorator_and_unknown_names() -> None:
    @register_objective("test_only_objective")
    class Mine(Objective):
        name = "test_only_objective"

    assert isinstance(objective_for(load_config(None, ["objective=test_only_objective"])), Mine)
    with pytest.raises(ConfigError, match=r"objective 'nope' is unknown; known objectives: .*cellpose.*distill"):
        objective_for(load_config(None, ["objective=nope"]))
