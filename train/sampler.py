"""Weighted multi-dataset sampler: deterministic, sharded across processes, resumable mid-epoch.

An epoch is `samples_per_epoch` draws WITH replacement over the usable examples of all datasets, a pure
function of (seed, epoch, position): never of global RNG state, Python's hash seed or the process count.
P(example i of dataset d) = w_d * w_i / sum_{j in d} w_j (w_d: dataset weight, w_i: image weight).

Sharding: positions are cut into blocks of `block_size`; block b belongs to rank b % world_size. The
shards are disjoint, equal-length, and their union is exactly the one-process epoch.

We own the state (seed, epoch, cursor) because accelerate's mid-epoch resume is broken (training_anchors
§5). Do NOT pass the DataLoader that uses this sampler through `accelerator.prepare`: the shard is already
this rank's; accelerate would shard it again. The cursor counts items handed out by the iterator, and a
DataLoader prefetches ahead of training: checkpoint with `state_dict(cursor=items_consumed_this_epoch)`.
Only rank 0's state needs saving: every rank's cursor is the same, and loading keeps the loader's rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_prep.canonical import CanonicalDataset, IndexRow

ImageWeights = Mapping[str, float] | Sequence[float] | None


def _check_int(label: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; ValueError naming `label` otherwise."""
    if not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        raise ValueError(f"{label} must be an integer in [{low}, {'inf' if high is None else high}], got {value!r}")
    return int(value)


class SampleKey(NamedTuple):
    """One draw: GLOBAL position in the epoch, dataset index, row index in `sampler.datasets[d]`, name."""

    position: int
    dataset_index: int
    example_index: int
    name: str


class MultiDatasetSampler:
    """Draws (dataset_index, example_name) pairs; see the module docstring for the sampling law.

    `datasets`: canonical dataset folders, read through CanonicalDataset(root, split=split) (None = all rows).
    `weights`: one probability per dataset (normalised), "balanced" (equal) or "size"/None (proportional
    to usable examples). `image_weights`: per dataset None (uniform), a mapping name -> weight, or a sequence
    aligned with the dataset's rows or its usable rows. Rows with n_objects < min_train_masks, and those in
    `exclude` ((dataset_index, name, reason) triples), are left out and counted in `excluded`.
    `samples_per_epoch` counts the whole epoch over all processes and must be divisible by
    world_size * block_size. `example_index` in keys indexes `self.datasets[d]` (excluded rows included).
    """

    def __init__(
        self,
        datasets: Sequence[str | os.PathLike[str]],
        weights: Sequence[float] | str | None = None,
        samples_per_epoch: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        split: str | None = "train",
        image_weights: Sequence[ImageWeights] | None = None,
        min_train_masks: int = 5,
        block_size: int = 1,
        exclude: Iterable[tuple[int, str, str]] = (),
    ) -> None:
        if isinstance(datasets, (str, os.PathLike)) or len(datasets) == 0:
            raise ValueError("datasets must be a non-empty list of canonical dataset folders")
        for label, value, low in (("samples_per_epoch", samples_per_epoch, 1), ("seed", seed, 0),
                                  ("world_size", world_size, 1), ("block_size", block_size, 1)):
            _check_int(label, value, low)
        _check_int("rank", rank, 0, world_size - 1)
        if samples_per_epoch % (world_size * block_size):
            raise ValueError(f"samples_per_epoch={samples_per_epoch} is not divisible by world_size*block_size="
                             f"{world_size}*{block_size}; the shards would not cover the one-process epoch")
        self.roots = [Path(r) for r in datasets]
        self.datasets = [CanonicalDataset(r, split=split) for r in self.roots]
        self.split, self.seed, self.rank, self.world_size = split, int(seed), int(rank), int(world_size)
        self.samples_per_epoch, self.block_size = int(samples_per_epoch), int(block_size)
        self._name_index: list[dict[str, int]] = []
        for root, ds in zip(self.roots, self.datasets, strict=True):
            self._name_index.append({name: i for i, name in enumerate(ds.names)})
            if len(self._name_index[-1]) != len(ds):
                raise ValueError(f"{root}: index.csv has duplicate example names")
        if isinstance(weights, str) and weights not in ("balanced", "size"):
            raise ValueError(f"weights must be a list of floats, 'balanced' or 'size', got {weights!r}")
        self._weight_mode = weights if isinstance(weights, str) else "size" if weights is None else "fixed"
        self._fixed_weights = None if self._weight_mode != "fixed" else self._check_weights(weights)
        if image_weights is not None and len(image_weights) != len(self.roots):
            raise ValueError(f"image_weights has {len(image_weights)} entries for {len(self.roots)} datasets")
        self._reasons: list[dict[int, str]] = [{} for _ in self.roots]
        for d, ds in enumerate(self.datasets):
            for i, row in enumerate(ds):
                if row.n_objects < min_train_masks:
                    self._reasons[d][i] = f"fewer than {min_train_masks} objects"
        self._add_reasons(exclude, commit=False)
        self._image_weights = [self._check_image_weights(d, (image_weights or [None] * len(self.roots))[d])
                               for d in range(len(self.roots))]
        self._recompute()
        self.epoch, self.cursor, self._generation = 0, 0, 0

    # ----- construction helpers -------------------------------------------------------------------------
    def _check_weights(self, weights: Any) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if len(w) != len(self.roots):
            raise ValueError(f"weights has {len(w)} entries for {len(self.roots)} datasets")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or math.fsum(w.tolist()) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
        return w / math.fsum(w.tolist())

    def _check_image_weights(self, d: int, weights: ImageWeights) -> np.ndarray:
        n, root = len(self.datasets[d]), self.roots[d]
        if weights is None:
            return np.ones(n)
        if isinstance(weights, Mapping):
            names = self.datasets[d].names
            missing = [name for i, name in enumerate(names) if name not in weights and i not in self._reasons[d]]
            if missing:
                raise ValueError(f"{root}: image_weights lacks {len(missing)} usable examples, e.g. {missing[:3]}")
            w = np.array([float(weights.get(name, 0.0)) for name in names])
        else:
            w = np.asarray(weights, dtype=np.float64).ravel()
            usable = np.array([i not in self._reasons[d] for i in range(n)], dtype=bool)
            if len(w) == usable.sum() and len(w) != n:
                w = np.zeros(n)
                w[usable] = np.asarray(weights, dtype=np.float64).ravel()
            elif len(w) != n:
                raise ValueError(f"{root}: image_weights has {len(w)} entries, expected {n} rows "
                                 f"or {usable.sum()} usable rows")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"{root}: image_weights must be finite and >= 0")
        return w

    def _add_reasons(self, triples: Iterable[tuple[int, str, str]], *, commit: bool = True) -> None:
        old = [dict(r) for r in self._reasons]
        for d, name, reason in triples:
            if not 0 <= d < len(self.roots) or name not in self._name_index[d]:
                raise ValueError(f"cannot exclude ({d}, {name!r}): no such example in the sampled rows")
            self._reasons[d].setdefault(self._name_index[d][name], str(reason))
        if commit:
            try:
                self._recompute()
            except ValueError:
                self._reasons = old
                raise

    def _recompute(self) -> None:
        """Per-example probabilities, their cumulative sums (float64, exactly reproducible) and fingerprint."""
        usable = [np.array([i not in r for i in range(len(ds))], dtype=bool)
                  for r, ds in zip(self._reasons, self.datasets, strict=True)]
        counts = np.array([u.sum() for u in usable], dtype=np.float64)
        if self._weight_mode == "fixed":
            dataset_w = self._fixed_weights
        elif self._weight_mode == "balanced":
            dataset_w = np.full(len(self.roots), 1.0 / len(self.roots))
        else:
            if counts.sum() == 0:
                raise ValueError("no usable examples in any dataset: " + ", ".join(map(str, self.roots)))
            dataset_w = counts / math.fsum(counts.tolist())
        probs = []
        for d, (u, w) in enumerate(zip(usable, self._image_weights, strict=True)):
            w = np.where(u, w, 0.0)
            total = math.fsum(w.tolist())
            if dataset_w[d] > 0 and total <= 0:
                raise ValueError(f"{self.roots[d]}: no usable examples (split={self.split!r}) but weight "
                                 f"{dataset_w[d]:.3g} > 0")
            probs.append(dataset_w[d] * w / total if total > 0 else w)
        self.dataset_weights, self._probs = dataset_w, probs
        flat = np.concatenate(probs)
        cum = np.cumsum(flat)
        self._cum = cum / cum[-1]
        self._owner = np.concatenate([np.full(len(p), d, dtype=np.int64) for d, p in enumerate(probs)])
        self._offset = np.concatenate([[0], np.cumsum([len(p) for p in probs])]).astype(np.int64)
        digest = hashlib.sha256(json.dumps([[self.split, ds.names, u.tolist()] for ds, u in
                                            zip(self.datasets, usable, strict=True)]).encode())
        digest.update(np.round(flat, 12).astype("<f8").tobytes())
        self.fingerprint = digest.hexdigest()[:16]
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ----- exclusions and summaries ---------------------------------------------------------------------
    def exclude(self, dataset_index: int, name: str, reason: str) -> None:
        """Leave example `name` of dataset `dataset_index` out (e.g. unreadable); recompute probabilities.
        Raises ValueError (state unchanged) if that leaves a dataset of weight > 0 with no usable example."""
        self._add_reasons([(dataset_index, name, reason)])

    @property
    def excluded(self) -> list[tuple[int, str, str]]:
        """(dataset_index, name, reason) of every left-out row, in dataset then row order."""
        return [(d, self.datasets[d][i].name, r[i]) for d, r in enumerate(self._reasons) for i in sorted(r)]

    def used_rows(self) -> list[IndexRow]:
        """The index rows the sampler may draw (excluded rows left out), in dataset then row order."""
        return [row for d, ds in enumerate(self.datasets) for i, row in enumerate(ds) if i not in self._reasons[d]]

    def probabilities(self, dataset_index: int) -> np.ndarray:
        """float64 (n_rows,) draw probability of each row of dataset `dataset_index` (0 for excluded rows)."""
        return self._probs[dataset_index].copy()

    def summary(self) -> list[dict[str, Any]]:
        """Per dataset: folder, rows, used, excluded, weight and {reason: count}."""
        return [{"dataset_index": d, "folder": str(root), "rows": len(self.datasets[d]),
                 "used": len(self.datasets[d]) - len(r), "excluded": len(r),
                 "weight": float(self.dataset_weights[d]), "reasons": dict(Counter(r.values()))}
                for d, (root, r) in enumerate(zip(self.roots, self._reasons, strict=True))]

    def summary_line(self) -> str:
        """One line for the log, e.g. 'sampler: 2 datasets, 80 examples used, 4 excluded (...): A 50/52 ...'."""
        rows = self.summary()
        reasons = sum((Counter(s["reasons"]) for s in rows), Counter())
        why = " (" + ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items())) + ")" if reasons else ""
        per = ", ".join(f"{Path(s['folder']).name} {s['used']}/{s['rows']} w={s['weight']:.3g}" for s in rows)
        return (f"sampler: {len(rows)} datasets, {sum(s['used'] for s in rows)} examples used, "
                f"{sum(s['excluded'] for s in rows)} excluded{why}: {per}")

    def example(self, dataset_index: int, example_index: int) -> tuple[Path, IndexRow]:
        """(dataset folder, IndexRow) of a key; `self.datasets[d].image(example_index)` reads the image."""
        return self.roots[dataset_index], self.datasets[dataset_index][example_index]

    # ----- the epoch ------------------------------------------------------------------------------------
    def epoch_keys(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole one-process epoch: (dataset_index, example_index), int64 (samples_per_epoch,) each,
        indexed by global position. Inverse CDF of PCG64(SeedSequence([seed, epoch])) uniforms."""
        _check_int("epoch", epoch, 0)
        if epoch not in self._epoch_cache:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            flat = np.searchsorted(self._cum, rng.random(self.samples_per_epoch), side="right")
            flat = np.minimum(flat, len(self._cum) - 1)
            owner = self._owner[flat]
            self._epoch_cache = {epoch: (owner, flat - self._offset[owner])}
        return self._epoch_cache[epoch]

    def shard_positions(self) -> np.ndarray:
        """int64 (len(self),) global positions of this rank's shard, in iteration order."""
        k = np.arange(len(self), dtype=np.int64)
        return ((k // self.block_size) * self.world_size + self.rank) * self.block_size + k % self.block_size

    def __len__(self) -> int:
        """This rank's share of the epoch: samples_per_epoch // world_size."""
        return self.samples_per_epoch // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the cursor goes back to 0 only when the epoch changes (resume-friendly)."""
        if _check_int("epoch", epoch, 0) != self.epoch:
            self.epoch, self.cursor, self._generation = int(epoch), 0, self._generation + 1

    def set_cursor(self, cursor: int) -> None:
        """Set how many of this rank's items of the current epoch count as done; the next iterator starts
        there (a live iterator is stopped)."""
        self.cursor, self._generation = _check_int("cursor", cursor, 0, len(self)), self._generation + 1

    def iter_positions(self) -> Iterator[SampleKey]:
        """Yield SampleKey for this rank's shard of the current epoch from the cursor; the cursor advances
        as keys are yielded. An epoch's end does not advance the epoch (call set_epoch)."""
        generation, start = self._generation, self.cursor
        dataset_index, example_index = self.epoch_keys(self.epoch)
        positions = self.shard_positions()[start:]
        ds_list, ex_list = dataset_index[positions].tolist(), example_index[positions].tolist()
        for k, (pos, d, i) in enumerate(zip(positions.tolist(), ds_list, ex_list, strict=True)):
            if generation != self._generation:
                return
            self.cursor = start + k + 1
            yield SampleKey(pos, d, i, self.datasets[d][i].name)

    iter_keys = iter_positions

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """Yield (dataset_index, example_name) from the same stream as iter_positions."""
        for key in self.iter_positions():
            yield key.dataset_index, key.name

    # ----- state ----------------------------------------------------------------------------------------
    def state_dict(self, cursor: int | None = None) -> dict[str, int | str]:
        """Plain dict of ints and strings. Pass `cursor` = items this rank actually consumed in this epoch
        (the DataLoader prefetches, so self.cursor may run ahead of training)."""
        cursor = _check_int("cursor", self.cursor if cursor is None else cursor, 0, len(self))
        return {"seed": self.seed, "epoch": self.epoch, "cursor": int(cursor),
                "samples_per_epoch": self.samples_per_epoch, "world_size": self.world_size, "rank": self.rank,
                "block_size": self.block_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: iteration then yields the rest of that epoch exactly. The rank stays this sampler's own.
        A different seed, samples_per_epoch, world_size, block_size or example/weight fingerprint raises
        ValueError (changing world_size could be supported later; it is refused for now)."""
        mine = self.state_dict()
        diffs = [f"{k}: saved {state.get(k)!r} != current {mine[k]!r}"
                 for k in ("seed", "samples_per_epoch", "world_size", "block_size", "fingerprint")
                 if state.get(k) != mine[k]]
        if diffs:
            raise ValueError("sampler state does not match this sampler (" + "; ".join(diffs) + ")")
        self.set_epoch(state["epoch"])
        self.set_cursor(state["cursor"])
