"""The binary family's data and objectives: loading-code statistics over many draws, reproducible samples on real
images, the losses and metrics, and class weighting measured on real images (through the one training loop)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_image_path, shared_masks_path

from cpsam.io import read_image, read_labels
from data_prep.canonical import write_example, write_index
from train.augment import AugmentConfig
from train.binary.loading_codes import code_table, loading_generator, parse_loading_code
from train.binary.objective import BinaryDataset, image_counts, summarize_counts
from train.data import PipelineSpec, SampleKey, sample_generators
from train.degrade import DegradeConfig
from train.loss import dice_jaccard, foreground_counts, soft_target_loss
from train.sampler import MultiDatasetSampler

N_DRAWS = 4000


def _tolerance(p: float, n: int = N_DRAWS) -> float:
    """5 binomial standard deviations of a frequency estimated from n draws."""
    return 5 * np.sqrt(p * (1 - p) / n)


def _marked(n_channels: int, size: int = 2) -> np.ndarray:
    """(C, size, size) image whose channel c holds the value c + 1 everywhere (so outputs say which channels)."""
    return np.stack([np.full((size, size), c + 1.0, np.float32) for c in range(n_channels)])


def _outputs(text: str, n_channels: int) -> np.ndarray:
    code = parse_loading_code(text)
    image = _marked(n_channels)
    return np.array([code.apply(image, loading_generator(7, 0, k))[0][:, 0, 0] for k in range(N_DRAWS)])


def test_randomization_picks_each_channel_uniformly() -> None:
    picked = _outputs("0|1|3", 4)[:, 0]
    assert set(np.unique(picked)) == {1.0, 2.0, 4.0}
    for value in (1.0, 2.0, 4.0):
        assert abs(np.mean(picked == value) - 1 / 3) < _tolerance(1 / 3)


def test_channel_dropout_blanks_with_probability_p() -> None:
    out = _outputs("0,2?0.3", 3)
    assert np.all(out[:, 0] == 1.0)
    assert set(np.unique(out[:, 1])) == {0.0, 3.0}
    assert abs(np.mean(out[:, 1] == 0) - 0.3) < _tolerance(0.3)


def test_merge_and_merge_dropout() -> None:
    assert np.all(_outputs("0+1+2", 3)[:, 0] == 2.0)  # the mean of 1, 2, 3
    merged = _outputs("0+1?0.25+2", 3)[:, 0]
    # channel 1 (value 2) joins: mean(1, 2, 3) = 2; it does not: mean(1, 3) = 2 as well -> use asymmetric values
    assert np.all(merged == 2.0)
    lopsided = _outputs("0+3?0.25", 4)[:, 0]  # 1 alone, or mean(1, 4) = 2.5 when channel 3 joins
    assert set(np.unique(lopsided)) == {1.0, 2.5}
    assert abs(np.mean(lopsided == 2.5) - 0.25) < _tolerance(0.25)
    only_optional = _outputs("1?0.4+2?0.4", 3)[:, 0]  # none joined (p 0.36): blank
    assert abs(np.mean(only_optional == 0) - 0.36) < _tolerance(0.36)
    assert abs(np.mean(only_optional == 2.5) - 0.16) < _tolerance(0.16)


def test_blank_user_codes_missing_channels_and_inference_rule() -> None:
    image = _marked(3)
    code = parse_loading_code("[x, 51, 7, 0|2, 1?0.9, 0+2?0.1]")
    out, told = code.apply(image)  # inference: no draw
    assert out[:, 0, 0].tolist() == [0.0, 2.0, 0.0, 1.0, 2.0, 2.0]  # grey = mean(1, 2, 3); channel 7 absent
    assert told == ["x", "51", "7", "0", "1", "0+2"]
    assert code.n_outputs == 6 and code.n_sources == 8 and code.uses_all_channels
    assert parse_loading_code("", 3).text == "0,1,2"
    assert {row[0] for row in code_table()} >= {"k", "x", "a|b|c", "k?p", "a+b+c", "a+b?p+c", "51", "52"}


@pytest.mark.parametrize("text, message", [
    ("53", "not registered"), ("0|a", "randomization"), ("1?1.5", "outside"), ("200", "neither"),
    ("51?0.5", "no dropout"), ("0,1", "makes 2 channels"),
])
def test_bad_codes_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loading_code(text, 3 if text == "0,1" else None)


def test_loading_stream_is_the_fourth_child_of_the_sample_seed() -> None:
    """A pure function of (seed, epoch, position), independent of the pipeline's geometry/degradation/intensity."""
    ours = loading_generator(3, 1, 42).random(4)
    fourth = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 1, 42]).spawn(4)[3])).random(4)
    assert np.array_equal(ours, fourth)
    assert not any(np.array_equal(ours, g.random(4)) for g in sample_generators(3, 1, 42))


# ------------------------------------------------------------------------------------------ real data


def _crops(folder: str, names: list[str], size: int, per_image: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for name in names:
        image = read_image(shared_image_path(folder, name))
        labels = read_labels(shared_masks_path(folder, name))
        for k in range(per_image):
            y, x = (k * 151) % (labels.shape[0] - size), (k * 233) % (labels.shape[1] - size)
            out.append((f"{name}_{k}", image[y:y + size, x:x + size], labels[y:y + size, x:x + size]))
    return out


@pytest.fixture(scope="module")
def hela(tmp_path_factory) -> Path:
    """A canonical dataset of 128-px HeLa crops: 6 from the training frames, 3 from the held-out frame."""
    root = tmp_path_factory.mktemp("hela")
    folder = "fluo_nuclei_ctc_N2DL-HeLa"
    rows = [write_example(root, n, i, m, dataset="hela", split="train", license="test", source=n)
            for n, i, m in _crops(folder, ["Fluo-N2DL-HeLa_01_t013", "Fluo-N2DL-HeLa_02_t075"], 128, 3)]
    rows += [write_example(root, n, i, m, dataset="hela", split="val", license="test", source=n)
             for n, i, m in _crops(folder, ["Fluo-N2DL-HeLa_02_t079"], 128, 3)]
    write_index(root, rows)
    return root


def _dataset(root: Path, code: str, n_out: int) -> BinaryDataset:
    sampler = MultiDatasetSampler([root], samples_per_epoch=8, seed=5, min_train_masks=1)
    spec = PipelineSpec(64, n_out, AugmentConfig(), DegradeConfig(fraction=0.0))
    return BinaryDataset(sampler, spec, seed=5, cache_mb=16, code=parse_loading_code(code, n_out))


def test_samples_are_reproducible_and_need_no_flows(hela: Path, monkeypatch) -> None:
    def no_flows(*_args, **_kwargs):
        raise AssertionError("the binary pipeline must not compute flows")

    monkeypatch.setattr("train.augment.masks_to_flows", no_flows)
    monkeypatch.setattr("train.data.masks_to_flows", no_flows)
    ds = _dataset(hela, "0?0.5,0", 2)
    keys = [SampleKey(0, k.position, k.dataset_index, k.example_index) for k in ds.sampler.iter_positions()]
    worker = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets
    blanks = 0
    for key in keys:
        a, b = ds[key], worker[key]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["image"].shape == (2, 64, 64) and a["target"].dtype == torch.int64
        assert torch.equal(a["target"], (a["masks"] > 0).long())
        blanks += int(not a["image"][0].any())
        assert a["image"][1].any()
    assert 0 < blanks < len(keys)  # channel 0 dropped in some samples, not all


def test_losses_and_metrics() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    target = (torch.rand(2, 8, 8) > 0.5).long()
    counts = foreground_counts(logits, target)
    pred, truth = logits.argmax(1) > 0, target > 0
    assert counts.tolist() == [float((pred & truth).sum()), float((pred & ~truth).sum()), float((~pred & truth).sum())]
    dice, jac = dice_jaccard(counts)
    tp, fp, fn = counts.tolist()
    assert float(dice) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert float(jac) == pytest.approx(tp / (tp + fp + fn))
    teacher = torch.randn(2, 2, 8, 8)
    for t in (1.0, 3.0):
        probs = torch.softmax(teacher / t, 1)
        loss = soft_target_loss(logits, probs, t)
        log_q = torch.log_softmax(logits / t, 1)
        manual = t * t * (probs * (probs.log() - log_q)).sum(1).mean()
        assert float(loss.detach()) == pytest.approx(float(manual.detach()), rel=1e-5)
        assert float(soft_target_loss(teacher, probs, t)) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    valid = torch.zeros(2, 8, 8)
    valid[0] = 1
    assert float(soft_target_loss(logits, probs, 3.0, valid).detach()) == pytest.approx(
        float(soft_target_loss(logits[:1], probs[:1], 3.0).detach()), rel=1e-5)
    sums = torch.tensor([[30.0, 10.0, 20.0, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    m = summarize_counts(sums, ["a", "b"])
    assert m["val_iou"] == pytest.approx(0.5) and m["val_precision"] == pytest.approx(0.75)
    assert m["val_recall"] == pytest.approx(0.6) and "val_iou/b" not in m
    assert image_counts(np.array([[0.9, 0.1], [0.6, 0.2]]), np.array([[1, 1], [0, 0]])).tolist() == [1, 1, 1]


def _train_class_weight(hela: Path, run: Path, init: Path, cell_weight: float) -> Path:
    from train.config import load_config
    from train.loop import train

    cfg = load_config(None, [
        "objective=binary", f"output_dir={run}", f"model.init={init}", "model.name=resnet10t_unet",
        f"data.train=[{hela}]", "data.tile_size=64", "data.num_workers=0", "data.min_train_masks=1",
        "batch_size=4", "schedule.kind=constant", "schedule.epochs=1", "schedule.samples_per_epoch=48",
        "optim.lr=0.002", "degrade.fraction=0", "val.every_epochs=0", "checkpoint.every_steps=1000",
        "log.tensorboard=false", "log.progress=false", f"binary.class_weights=[1.0,{cell_weight}]",
    ])
    train(cfg)
    return run / "model.pt"


def _recalibrate_batchnorm(net: torch.nn.Module, ds: BinaryDataset) -> None:
    """Precise BatchNorm: running statistics recomputed as exact averages over training crops (after a few steps
    the default momentum-0.1 averages still lean on their initial values, and eval-mode outputs are off)."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    keys = [SampleKey(0, k.position, k.dataset_index, k.example_index) for k in ds.sampler.iter_positions()]
    net.train()
    with torch.no_grad():
        for k in range(0, len(keys), 4):
            net(torch.stack([ds[key]["image"] for key in keys[k:k + 4]]))
    for m in norms:
        m.momentum = 0.1
    net.eval()


def test_raising_the_cell_weight_raises_recall_and_lowers_precision(hela: Path, tmp_path: Path) -> None:
    """Same init, same data order, 12 steps each: cell weight 4 vs 1, scored on the held-out frame's crops.

    Hard scores (probability > 0.5) and soft ones (recall = sum(p * cell) / cells, precision = sum(p * cell) /
    sum(p)). Measured here: weight 1 precision 0.87 / recall 0.79, weight 4 precision 0.43 / recall 0.99.
    """
    from data_prep.canonical import CanonicalDataset
    from train.binary.predict import cell_probability, load_binary_model, predict_probabilities
    from train.binary.workflow import make_init

    init = make_init(tmp_path / "init.pt", "resnet10t_unet", 1, seed=0, decoder_div=8)
    val = CanonicalDataset(hela, split="val")
    train_crops = _dataset(hela, "", 1)
    scores = {}
    for weight in (1.0, 4.0):
        net, code = load_binary_model(_train_class_weight(hela, tmp_path / f"w{weight:g}", init, weight))
        _recalibrate_batchnorm(net, train_crops)
        probs = [cell_probability(predict_probabilities(net, val.image(i), code, tile=128)) for i in range(len(val))]
        truth = [val.mask(i) > 0 for i in range(len(val))]
        tp, fp, fn = sum(image_counts(p, t) for p, t in zip(probs, truth, strict=True))
        soft_tp = sum(float((p * t).sum()) for p, t in zip(probs, truth, strict=True))
        scores[weight] = {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
                          "soft_precision": soft_tp / sum(float(p.sum()) for p in probs),
                          "soft_recall": soft_tp / sum(float(t.sum()) for t in truth)}
    low, high = scores[1.0], scores[4.0]
    print("cell weight 1:", low, "cell weight 4:", high)
    assert high["soft_recall"] > low["soft_recall"] + 0.02, scores
    assert high["soft_precision"] < low["soft_precision"] - 0.02, scores
    assert high["recall"] > low["recall"] + 0.05 and high["precision"] < low["precision"] - 0.05, scores
    assert 0.5 < low["recall"] < 0.99 and low["precision"] > 0.5, scores  # weight 1 is no degenerate segmenter
