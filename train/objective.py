"""What a run optimizes: the objective that plugs into the one training loop (`train.loop.train`).

The loop owns everything that is the same for every model kind (accelerate, data order, accumulation,
checkpoints, resume, logging, the schedule); an Objective owns what differs:

- `dataset(...)`: the map-style dataset the loop's sampler keys index (default: `train.data.TrainDataset`,
  the Cellpose flow targets); distillation wraps it to add cached teacher outputs, the binary family to
  add loading codes and 0/1 targets. Every dataset returns a dict of tensors with at least `image`.
- `initialize(net, fresh)`: after the network is built and before training (a resumed run then loads its
  checkpoint over it); default nothing; distillation can start a student from its teacher's weights
  (kd.init_from_teacher).
- `aux_modules(net)`: trainable modules beside the network (e.g. a feature adapter of a KD loss). They are
  optimized with the network and saved in the full-state checkpoint (`aux`), never in `model.pt`.
- `prepare_batch(batch, device)`: runs on each rank after the batch reached its device, outside autograd
  (the online teacher of distillation fills its targets here).
- `loss(net, aux, batch)`: the micro-batch's loss and its named parts (`term_names`, logged in metrics.csv).
- `validate(net, ...)` and `val_columns`, `best_metric`: how a run is scored on `data.val` and which metric
  picks `checkpoints/best` (default: AP by `train.validate`, best by `val_ap50`).

`objective_for(cfg)` picks the objective named by the config key `objective`. Other objectives are
plug-ins that register themselves (`@register_objective("name")` on the class) when their module is
imported; train/ never names them. The distillation wing's live in `distill/`, which imports train/ and
never the other way round. A plug-in declares where it lives as a Python entry point in the group
`cpsam.objectives` (pyproject.toml: `[project.entry-points."cpsam.objectives"]`,
`distill = "distill.objective:DistillObjective"`); the first time a config names an objective that is not
registered yet, `objective_for` loads the entry point of that name, so that `cpsam train CONFIG.yaml` and
`accelerate launch -m cpsam train` resume a distillation run too, and a package outside this repository
can add an objective by declaring one.

Entry points are read from the installed package metadata and, when the code runs from a checkout
(a pyproject.toml of the `cpsam` project beside these packages), from that pyproject.toml too: the
checkout's table wins, so a new plug-in works from a source tree whose editable install predates it
(`pip install -e .` records entry points only when it runs).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from cpsam.segment import rules_for
from train.config import ConfigError, TrainConfig
from train.data import TrainDataset
from train.logs import VAL_COLUMNS
from train.loss import cellpose_loss_terms
from train.validate import list_val_images, validate

ENTRY_POINT_GROUP = "cpsam.objectives"


class Objective:
    """The Cellpose flow objective (CP-SAM, CPnet, any flow model); the base of every other objective."""

    name = "cellpose"
    term_names: tuple[str, ...] = ("loss_flow", "loss_cellprob")
    best_metric = "val_ap50"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    # ----------------------------------------------------------------- data
    def dataset(self, sampler, spec, seed: int, cache_mb: int) -> torch.utils.data.Dataset:
        """The dataset the loop's SampleKeys index (see train.data.TrainDataset for the keys and tensors)."""
        return TrainDataset(sampler, spec, seed, cache_mb)

    def initialize(self, net: nn.Module, fresh: bool = True) -> str | None:
        """Change the built `net` in place before training (`fresh`: a new run; False: a resumed one, whose
        checkpoint is loaded over it afterwards); returns a line for the log, or None. The flow objective leaves
        it as model.init made it."""
        return None

    def aux_modules(self, net: nn.Module) -> nn.ModuleDict:
        """Trainable modules optimized beside `net` (none for the flow objective)."""
        return nn.ModuleDict()

    def prepare_batch(self, batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """Called on the device-resident micro-batch before the forward pass, under no_grad."""
        return batch

    # ----------------------------------------------------------------- loss
    def loss(self, net: nn.Module, aux: nn.ModuleDict, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, {term name: value}) of one micro-batch: 0-d float32 tensors, `loss` on the autograd graph."""
        output = net(batch["image"])[0]
        terms = cellpose_loss_terms(output, batch["target"], batch.get("valid"))
        return terms.loss, {"loss_flow": terms.flow, "loss_cellprob": terms.cellprob}

    # ----------------------------------------------------------------- validation
    def val_columns(self, dataset_names: Sequence[str]) -> list[str]:
        """metrics.csv columns of a validation row."""
        return [*VAL_COLUMNS, *(f"val_ap50/{n}" for n in dataset_names)]

    def validate(self, net: nn.Module, images: Sequence[Any], n_datasets: int, rank: int, world: int,
                 reduce_sum: Callable[[Tensor], Tensor], **kwargs: Any) -> dict[str, float]:
        """Score `net` on this rank's share of `images`, summed over ranks (train.validate.validate's contract)."""
        return validate(net, images, n_datasets, rank, world, reduce_sum, **kwargs)

    def list_val_images(self, roots: Sequence[str], split: str | None, max_images: int | None) -> list[Any]:
        """The validation images of `data.val` (default: rows of canonical datasets)."""
        return list_val_images(roots, split, max_images)

    # ----------------------------------------------------------------- inference
    def inference_record(self, net: nn.Module) -> dict[str, Any]:
        """What inference needs to know about the trained `net`, written into model.pt as `inference` (read back
        by `cpsam.segment.recorded_inference`). Applied by `cpsam segment` / `Segmenter`: the flow -> mask rules
        ("cp3" / "cp4") and, where the run knows them, the cellpose-3 channels [SEG, NUC] of its raw images.
        Recorded for reference only (the command-line defaults stand): the mask thresholds of validation."""
        val = self.cfg.val
        return {"mask_rules": val.mask_rules or rules_for(net).mask_rules, "flow_threshold": float(val.flow_threshold),
                "cellprob_threshold": float(val.cellprob_threshold), "channels": None}


class StepModule(nn.Module):
    """The module accelerate wraps (DDP): the network plus the objective's trainable aux modules.

    `forward(batch)` returns {"loss": ..., **terms}; DDP all-reduces the gradients of `net` and `aux` together.
    `run_net` is the module the forward calls (the network, or its torch.compile wrapper); it is kept out of the
    module tree so that the parameters are registered once, under `net`.
    """

    def __init__(self, net: nn.Module, aux: nn.ModuleDict, objective: Objective, run_net: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.aux = aux
        self.__dict__["objective"] = objective
        self.__dict__["run_net"] = run_net if run_net is not None else net

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        loss, terms = self.objective.loss(self.run_net, self.aux, batch)
        return {"loss": loss, **terms}


Factory = Callable[[TrainConfig], Objective]
F = TypeVar("F", bound=Factory)

# name -> factory(cfg): the flow objective, then every plug-in whose module has been imported
_REGISTRY: dict[str, Factory] = {"cellpose": Objective}


def register_objective(name: str, factory: F | None = None) -> F | Callable[[F], F]:
    """Make `objective=name` in a config build `factory(cfg)` (usually an Objective subclass).

    As a decorator on the class: `@register_objective("distill")`; or called: `register_objective(name, factory)`.
    Returns the factory unchanged (the decorator form returns the decorator).
    """

    def add(f: F) -> F:
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def _checkout_entry_points() -> dict[str, str]:
    """name -> "module:attribute" of the `cpsam.objectives` table in the pyproject.toml of the checkout these
    packages run from ({} when installed from a wheel, or for a pyproject.toml of another project)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if project.get("name") != "cpsam":
        return {}
    table = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return {str(k): str(v) for k, v in table.items()}


def declared_objectives() -> dict[str, metadata.EntryPoint]:
    """Plug-in objectives declared as entry points (group `cpsam.objectives`): installed ones, then the
    checkout's pyproject.toml over them (see the module docstring)."""
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for name, value in _checkout_entry_points().items():
        found[name] = metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
    return found


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective the config key `objective` names; ConfigError for an unknown name.

    A name not registered yet is looked up among the declared plug-ins (`declared_objectives`); loading its
    entry point imports the plug-in's module, which registers it, and gives its factory.
    """
    name = cfg.objective
    if name not in _REGISTRY:
        declared = declared_objectives()
        if name not in declared:
            known = sorted(set(_REGISTRY) | set(declared))
            raise ConfigError(f"objective {name!r} is unknown; known objectives: {', '.join(known)}")
        _REGISTRY.setdefault(name, declared[name].load())
    return _REGISTRY[name](cfg)
