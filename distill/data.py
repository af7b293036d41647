"""Training samples of distillation: the one pipeline's crop (train.data.TrainDataset) plus teacher targets.

Both datasets are indexed by the loop's SampleKeys and return TrainDataset's tensors (the crop in the TEACHER's
channels as `image`, its Cellpose targets from the dataset's masks, ...) plus
    brightness  float32 ()        the student's brightness factor (1.0 when kd.brightness is off)
and, from the cache only (online, `DistillObjective.prepare_batch` adds them after the batch reached its device):
    t_output    float32 (3, T, T) the teacher's raw output [dY, dX, cellprob logit]
    t_feature   float32 (C, h, w) the teacher's feature map (when the feature term is on)

- `OnlineDistillDataset`: the crop of the loop's key (the teacher runs later, on the device).
- `CachedDistillDataset`: the loop's key picks one of the example's K cached views (`cache.pick_view`, a pure
  function of the key); the crop is rebuilt from that view's stored key with the cache's seed and pipeline, so it
  is exactly the input the teacher saw, and the stored fp16 targets come with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from distill.cache import TeacherCache, pick_view
from distill.student_input import brightness_factor
from train.config import KDConfig
from train.data import SampleKey, TrainDataset


def _brightness(kd: KDConfig, seed: int, key: SampleKey) -> torch.Tensor:
    factor = brightness_factor(seed, key.epoch, key.position, kd.brightness_p, kd.brightness_min, kd.brightness)
    return torch.tensor(factor, dtype=torch.float32)


class OnlineDistillDataset(Dataset):
    """The pipeline's crop of each key + the brightness factor (the teacher runs in the training step)."""

    def __init__(self, base: TrainDataset, kd: KDConfig, seed: int) -> None:
        self.base = base
        self.kd = kd
        self.seed = int(seed)
        self.sampler = base.sampler  # the loop's KeySampler reads it

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        key = SampleKey(*key)
        sample = self.base[key]
        sample["brightness"] = _brightness(self.kd, self.seed, key)
        return sample


class CachedDistillDataset(Dataset):
    """The crop of one cached view per key, with its stored teacher targets (see the module docstring).

    base: a TrainDataset with the CACHE's seed and pipeline spec over the run's sampler; feature: the teacher
    feature name to return as t_feature (None = none); seed: the run's seed (picks views, brightness).
    """

    def __init__(self, base: TrainDataset, cache: TeacherCache, kd: KDConfig, seed: int,
                 feature: str | None = None) -> None:
        self.base = base
        self.cache = cache
        self.kd = kd
        self.seed = int(seed)
        self.feature = feature
        self.sampler = base.sampler

    def __len__(self) -> int:
        return len(self.base)

    def view_of(self, key: SampleKey) -> int:
        """The cached view the training key uses."""
        return pick_view(self.seed, key.epoch, key.position, self.cache.views)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        key = SampleKey(*key)
        view = self.view_of(key)
        sample = self.base[self.cache.view_key(key.dataset_index, key.example_index, view)]
        stored = self.cache.load_view(key.dataset_index, key.example_index, view)
        sample["t_output"] = stored["output"]
        if self.feature is not None:
            sample["t_feature"] = stored["features"][self.feature]
        sample["brightness"] = _brightness(self.kd, self.seed, key)
        # the loop logs the sampler's key; the replayed sample carries the view's key: put the loop's back
        for name, value in zip(("epoch", "position", "dataset_index", "example_index"), key, strict=True):
            sample[name] = torch.tensor(value, dtype=torch.int64)
        return sample


def stack_crops(dataset: Dataset, keys: Sequence[SampleKey]) -> dict[str, torch.Tensor]:
    """The samples of `keys` stacked into one batch dict (tensors only)."""
    samples = [dataset[k] for k in keys]
    return {name: torch.stack([s[name] for s in samples]) for name in samples[0]}
