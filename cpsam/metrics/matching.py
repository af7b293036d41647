"""Instance matching between two label images: sparse overlap table and optimal assignment.

The assignment is the one `cellpose.metrics` and `stardist.matching.matching` compute with a dense
Hungarian solve over every (true, predicted) pair: minimise

    cost(i, j) = -[IoU(i, j) >= t] - IoU(i, j) / (2 * n_min)

i.e. first the *number* of pairs with IoU >= t is maximised, then, among those assignments, the
sum of IoU over all assigned pairs (the second term sums to < 1/2, so it only breaks ties).

We never build the dense (n_true x n_pred) matrix. Pairs with zero overlap contribute zero cost,
so the optimum splits over the connected components of the "overlaps" graph; a component with a
single edge is matched directly, and only components with two or more edges get a small
`scipy.optimize.linear_sum_assignment`. When the pairs with IoU >= t already form a matching
(always the case for t > 0.5: an object can have IoU > 0.5 with at most one other object), those
pairs are the true positives and no solve is needed at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Below this many cells the overlap table is counted with one dense bincount (fast); above it with
# a sort (np.unique), which needs no (n_true+1)*(n_pred+1) buffer.
_DENSE_TABLE_MAX = 1 << 24


@dataclass(frozen=True)
class Overlap:
    """Sparse overlap table of two label images (every pair that shares at least one pixel).

    Objects are indexed 0..n-1 in increasing order of their original id (`true_ids`, `pred_ids`).
    Areas and intersections are pixel counts (int64); `iou` is float64, computed as
    intersection / (area_true + area_pred - intersection), bit-identical to cellpose's division.
    """

    true_ids: np.ndarray  # (n_true,) original label ids present in the ground truth
    pred_ids: np.ndarray  # (n_pred,) original label ids present in the prediction
    true_area: np.ndarray  # (n_true,) int64 pixels
    pred_area: np.ndarray  # (n_pred,) int64 pixels
    pair_true: np.ndarray  # (n_pairs,) intp index into true_ids
    pair_pred: np.ndarray  # (n_pairs,) intp index into pred_ids
    intersection: np.ndarray  # (n_pairs,) int64 pixels
    iou: np.ndarray  # (n_pairs,) float64
    foreground_true: int  # pixels with a ground-truth label
    foreground_pred: int  # pixels with a predicted label
    foreground_both: int  # pixels labelled in both

    @property
    def n_true(self) -> int:
        return int(self.true_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def foreground_union(self) -> int:
        """Pixels labelled in either image."""
        return self.foreground_true + self.foreground_pred - self.foreground_both


@dataclass(frozen=True)
class Assignment:
    """Pairs chosen by the optimal assignment (indices into an `Overlap`'s pair arrays)."""

    pairs: np.ndarray  # (k,) intp indices of assigned overlapping pairs (IoU > 0)
    tp: np.ndarray  # (k,) bool: assigned pair with IoU >= threshold

    @property
    def n_tp(self) -> int:
        return int(np.count_nonzero(self.tp))


def as_labels(x: object) -> np.ndarray:
    """A numpy view of a label image given as a numpy array or a torch tensor on any device."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor (CPU or CUDA) without importing torch
        return x.detach().cpu().numpy()
    return x  # type: ignore[return-value]  # validated by check_label_pair


def check_label_pair(true: np.ndarray, pred: np.ndarray) -> None:
    """Raise ValueError unless `true` and `pred` are same-shape, non-negative integer label arrays."""
    for name, arr in (("ground truth", true), ("prediction", pred)):
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{name} labels must be a numpy array, got {type(arr).__name__}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} labels must have an integer dtype, got {arr.dtype}")
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise ValueError(f"{name} labels must be >= 0 (0 = background), found {arr.min()}")
    if true.shape != pred.shape:
        raise ValueError(f"shape mismatch: ground truth {true.shape} vs prediction {pred.shape}")


def _id_table(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ids present in a flat label array and their areas.

    Returns (ids (n,) sorted, areas (n,) int64, lut) where lut maps an original id to 1..n
    (index + 1), or None when ids are too large for a table (then use `np.searchsorted(ids, x)`).
    """
    top = int(flat.max()) if flat.size else 0
    if top <= max(4 * flat.size, 1 << 16):
        if not np.can_cast(flat.dtype, np.intp):
            flat = flat.astype(np.intp)  # uint64 with small ids: bincount needs a safe cast
        counts = np.bincount(flat, minlength=top + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids, counts[ids].astype(np.int64), lut
    # Huge ids (e.g. hashed uint64): a sort instead of a table the size of the largest id.
    ids, areas = np.unique(flat[flat != 0], return_counts=True)
    return ids, areas.astype(np.int64), None


def _index(values: np.ndarray, ids: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """0-based object index of each (non-zero) id in `values`."""
    if lut is not None:
        return lut[values] - 1
    return np.searchsorted(ids, values).astype(np.intp)


def label_overlap(true: np.ndarray, pred: np.ndarray) -> Overlap:
    """Sparse overlap table of a ground-truth and a predicted label image.

    Args:
        true, pred: (H, W) (or any same shape) integer label images, 0 = background; ids need not
            be consecutive; any integer dtype; numpy arrays or torch tensors (any device).
    Returns:
        Overlap with every pair of objects that share at least one pixel.
    Raises:
        ValueError on shape mismatch, non-integer dtype or negative ids.
    """
    true, pred = as_labels(true), as_labels(pred)
    check_label_pair(true, pred)
    ft, fp = true.ravel(), pred.ravel()
    true_ids, true_area, lut_t = _id_table(ft)
    pred_ids, pred_area, lut_p = _id_table(fp)
    both = (ft != 0) & (fp != 0)
    t = _index(ft[both], true_ids, lut_t)
    p = _index(fp[both], pred_ids, lut_p)
    stride = pred_ids.size
    key = t * stride + p
    if true_ids.size * stride <= _DENSE_TABLE_MAX:
        table = np.bincount(key, minlength=true_ids.size * stride)
        cells = np.flatnonzero(table)
        inter = table[cells].astype(np.int64)
    else:
        cells, inter = np.unique(key, return_counts=True)
        inter = inter.astype(np.int64)
    pair_true = (cells // max(stride, 1)).astype(np.intp)
    pair_pred = (cells % max(stride, 1)).astype(np.intp)
    iou = inter / (true_area[pair_true] + pred_area[pair_pred] - inter)
    return Overlap(
        true_ids=true_ids,
        pred_ids=pred_ids,
        true_area=true_area,
        pred_area=pred_area,
        pair_true=pair_true,
        pair_pred=pair_pred,
        intersection=inter,
        iou=iou.astype(np.float64, copy=False),
        foreground_true=int(true_area.sum()),
        foreground_pred=int(pred_area.sum()),
        foreground_both=int(key.size),
    )


def _local_index(comp: np.ndarray) -> np.ndarray:
    """Rank of every node among the nodes of its component (0-based, in index order)."""
    order = np.argsort(comp, kind="stable")
    starts = np.searchsorted(comp[order], comp[order], side="left")
    local = np.empty(comp.size, np.intp)
    local[order] = np.arange(comp.size) - starts
    return local


def assign(ov: Overlap, threshold: float, *, full: bool = False) -> Assignment:
    """Optimal assignment at IoU `threshold` (cellpose's / StarDist's Hungarian criterion).

    Args:
        ov: the overlap table of one image pair.
        threshold: IoU threshold t; a pair is a true positive when its IoU >= t.
        full: also return the assigned pairs below the threshold (cellpose's
            `aggregated_jaccard_index` uses them). Without it the shortcut "pairs >= t form a
            matching" may skip the solve, and only true-positive pairs are returned.
    Returns:
        Assignment: assigned overlapping pairs and which of them are true positives.
    """
    above = ov.iou >= threshold
    if not full:
        hits_t = np.bincount(ov.pair_true[above], minlength=ov.n_true)
        hits_p = np.bincount(ov.pair_pred[above], minlength=ov.n_pred)
        if (hits_t.max(initial=0) <= 1) and (hits_p.max(initial=0) <= 1):
            pairs = np.flatnonzero(above)
            return Assignment(pairs=pairs, tp=np.ones(pairs.size, bool))
    if ov.iou.size == 0:
        return Assignment(pairs=np.zeros(0, np.intp), tp=np.zeros(0, bool))
    # Connected components of the bipartite graph (true objects, then predicted objects as nodes).
    n_nodes = ov.n_true + ov.n_pred
    graph = coo_matrix(
        (np.ones(ov.iou.size, np.int8), (ov.pair_true, ov.n_true + ov.pair_pred)), shape=(n_nodes, n_nodes)
    )
    _, node_comp = connected_components(graph, directed=False)
    comp_t, comp_p = node_comp[: ov.n_true], node_comp[ov.n_true :]
    local_t, local_p = _local_index(comp_t), _local_index(comp_p)
    rows_per_comp = np.bincount(comp_t, minlength=node_comp.max() + 1)
    cols_per_comp = np.bincount(comp_p, minlength=node_comp.max() + 1)
    comp = comp_t[ov.pair_true]
    single = np.bincount(comp)[comp] == 1
    chosen = [np.flatnonzero(single)]
    multi = np.flatnonzero(~single)
    if multi.size:
        multi = multi[np.argsort(comp[multi], kind="stable")]
        for group in np.split(multi, np.flatnonzero(np.diff(comp[multi])) + 1):
            c = comp[group[0]]
            shape = (rows_per_comp[c], cols_per_comp[c])
            r_idx, c_idx = local_t[ov.pair_true[group]], local_p[ov.pair_pred[group]]
            iou = np.zeros(shape)
            iou[r_idx, c_idx] = ov.iou[group]
            pair_of = np.full(shape, -1, np.intp)
            pair_of[r_idx, c_idx] = group
            cost = -(iou >= threshold).astype(float) - iou / (2 * min(shape))
            ri, ci = linear_sum_assignment(cost)
            picked = pair_of[ri, ci]
            chosen.append(picked[picked >= 0])
    pairs = np.sort(np.concatenate(chosen))
    return Assignment(pairs=pairs, tp=above[pairs])
