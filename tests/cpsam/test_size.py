"""Size models (cpsam.size, train.size_fit) and diameter estimation in the Segmenter.

Equivalence: cellpose 3.1.1.2's SizeModel with cyto_0 on six real images
(../shared/golden/cellpose3_cyto0/size_estimates.json): the style estimate within 1 %, the final
diameter within 2 %. Measured here: style estimates equal to 1e-7 on all six; final diameters
+0.77 % (HeLa), -1.45 % (3T3), -0.37 % (tissue), -0.44 % (CPM-15), -1.35 % (U373), +0.13 % (DeepCell).
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import tifffile
import torch
from conftest import read_shared_image, shared_path

from cpsam.models import CPnet, cpnet_from_state_dict
from cpsam.segment import Segmenter
from cpsam.size import SizeModel, SizeModelError, find_size_model, load_size_model, median_diameter


@cache
def golden_cases() -> list[dict]:
    return json.loads(shared_path("golden", "cellpose3_cyto0", "size_estimates.json").read_text())["cases"]


def golden_image(case: dict) -> np.ndarray:
    return read_shared_image(case["folder"], case["name"])


@pytest.fixture(scope="module")
def segmenter(cyto0_state_dict: dict[str, torch.Tensor], cyto_size_model: SizeModel) -> Segmenter:
    """cyto_0 with its size model, shared by this module's tests (they only segment with it)."""
    return Segmenter(cpnet_from_state_dict(cyto0_state_dict).eval(), device="cpu", size_model=cyto_size_model)


def test_load_the_shared_size_file_and_its_formula(size_model_file):
    size = load_size_model(size_model_file)
    raw = np.load(size_model_file, allow_pickle=True).item()  # trusted test file
    assert size.diam_mean == 27.0 and size.style_channels == 256
    np.testing.assert_array_equal(size.A, raw["A"])
    style = np.random.default_rng(0).normal(size=256).astype(np.float32)
    style /= np.linalg.norm(style)
    expected = np.exp(raw["A"] @ (style - raw["smean"]).T + np.log(raw["diam_mean"]) + raw["ymean"])
    assert size.style_diameter(style) == pytest.approx(max(5.0, float(expected)), rel=1e-12)
    # the 5-px floor of cellpose's _size_estimation
    tiny = SizeModel(A=np.full(4, -100.0), smean=np.zeros(4), diam_mean=30.0, ymean=0.0)
    assert tiny.style_diameter(np.ones(4)) == 5.0


def test_save_load_roundtrip_is_readable_by_cellpose_style_np_load(tmp_path):
    size = SizeModel(A=np.linspace(-1, 1, 8), smean=np.arange(8.0), diam_mean=17.0, ymean=0.25)
    path = size.save(tmp_path / "model.pt_size.npy")
    again = load_size_model(path)
    np.testing.assert_array_equal(again.A, size.A)
    assert (again.diam_mean, again.ymean) == (17.0, 0.25)
    raw = np.load(path, allow_pickle=True).item()  # how cellpose 3 reads it
    assert set(raw) == {"A", "smean", "diam_mean", "ymean"}
    (tmp_path / "model.pt").write_bytes(b"x")
    assert find_size_model(tmp_path / "model.pt") is not None
    assert find_size_model(tmp_path / "other.pt") is None


def test_hostile_or_wrong_size_files_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save(tmp_path / "evil.npy", np.array({"A": Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(SizeModelError, match="evil.npy.*refusing"):
        load_size_model(tmp_path / "evil.npy")
    assert not marker.exists()
    np.save(tmp_path / "partial.npy", np.array({"A": np.zeros(3)}, dtype=object), allow_pickle=True)
    with pytest.raises(SizeModelError, match=r"partial.npy: not a cellpose size model \(missing smean"):
        load_size_model(tmp_path / "partial.npy")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(SizeModelError, match="text.npy"):
        load_size_model(tmp_path / "text.npy")
    with pytest.raises(SizeModelError, match="missing.npy: cannot read"):
        load_size_model(tmp_path / "missing.npy")


def test_median_diameter_is_cellposes_definition():
    labels = np.zeros((60, 60), np.int32)
    labels[:10, :10] = 1  # area 100
    labels[20:40, 20:40] = 2  # area 400
    labels[50:59, 50:59] = 7  # area 81
    assert median_diameter(labels) == pytest.approx(10.0 / (np.sqrt(np.pi) / 2))
    assert median_diameter(np.zeros((5, 5), np.uint16)) == 0.0


FAST_CASES = ["neurips22_cell_00849", "cpm15_image01", "PhC-C2DH-U373_01_t021"]  # the three smallest images
SLOW_CASES = ["Fluo-N2DL-HeLa_01_t013", "usiigaci_set1", "deepcell2016_training_nuclei_set4_crop"]
ALL_CASES = FAST_CASES + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_CASES]


@pytest.mark.parametrize("name", ALL_CASES)
def test_style_estimate_equals_cellpose3(name, segmenter):
    for case in [c for c in golden_cases() if c["name"] == name]:
        first = segmenter.segment([golden_image(case)], channels=case["channels"], compute_masks=False,
                                  estimate_diameters=False)[0]
        assert first.style is not None and first.style.shape == (256,)
        assert np.linalg.norm(first.style) == pytest.approx(1.0, abs=1e-5)
        estimate = segmenter.size_model.style_diameter(first.style)
        assert estimate == pytest.approx(case["diam_style"], rel=0.01), case["name"]


@pytest.mark.parametrize("name", ["cpm15_image01", "PhC-C2DH-U373_01_t021"]
                         + [pytest.param(n, marks=pytest.mark.slow) for n in ["neurips22_cell_00849", *SLOW_CASES]])
def test_final_diameter_within_2_percent_of_cellpose3(name, segmenter):
    case = next(c for c in golden_cases() if c["name"] == name)
    diam, diam_style = segmenter.estimate_diameter(golden_image(case), channels=case["channels"])
    assert diam_style == pytest.approx(case["diam_style"], rel=0.01)
    assert diam == pytest.approx(case["diam"], rel=0.02)


def test_segment_without_a_diameter_uses_the_size_model_and_says_so(segmenter, cyto0_net: CPnet):
    case = next(c for c in golden_cases() if c["name"] == "Fluo-N2DL-HeLa_01_t013")
    image = golden_image(case)[200:456, 300:556]  # a 256 x 256 crop: ~20 nuclei
    auto = segmenter.segment([image], channels=[0, 0])[0]
    diam, diam_style = segmenter.estimate_diameter(image, channels=[0, 0])
    assert auto.diameter_source == "size model" and auto.n_cells > 5
    assert (auto.diameter, auto.diameter_style) == (diam, diam_style)
    assert 18.0 < diam < 35.0  # HeLa nuclei: 26 px median in the annotation
    assert auto.rescale == pytest.approx(27.0 / auto.diameter, rel=1e-6)
    given = segmenter.segment([image], channels=[0, 0], diameter=auto.diameter)[0]
    assert given.diameter_source == "given" and given.diameter == auto.diameter
    np.testing.assert_array_equal(given.masks, auto.masks)  # the same segmentation at that diameter
    plain = Segmenter(cyto0_net, device="cpu").segment([image[:200, :200]], channels=[0, 0])[0]
    assert plain.diameter_source == "model" and plain.diameter == 27.0


def test_pretrained_cyto0_carries_its_size_model(cyto_size_model: SizeModel):
    from cpsam.models.pretrained import PretrainedUnavailableError, pretrained

    try:
        model = pretrained("cyto_0")
    except PretrainedUnavailableError as exc:
        pytest.skip(f"cyto_0 is not obtainable here: {exc}")
    assert model.size_model is not None
    np.testing.assert_array_equal(model.size_model.A, cyto_size_model.A)


def test_fitted_size_model_orders_and_approximates_real_diameters(cyto0_net: CPnet):
    from cpsam.transforms import select_channels, to_channels_last
    from train.size_fit import fit_size_model

    def load(folder: str):
        out = []
        for path in sorted(shared_path("data", folder).glob("*_img.tif")):
            labels = tifffile.imread(path.with_name(path.name.replace("_img", "_masks")))
            image = select_channels(to_channels_last(tifffile.imread(path)), [0, 0], 2).transpose(2, 0, 1)
            out.append((image, labels))
        return out

    hela, phase = load("fluo_nuclei_ctc_N2DL-HeLa"), load("phase_usiigaci_3t3")
    train = hela[:3] + phase[:3]
    report = fit_size_model(cyto0_net, [x for x, _ in train], [y for _, y in train], n_epochs=2, crop=256,
                            progress=False)
    assert report.n_samples == 12 and report.train_correlation > 0.8
    seg = Segmenter(cyto0_net, device="cpu", size_model=report.size_model)
    estimates = {}
    for label, (image, labels) in (("hela", hela[3]), ("3t3", phase[3])):
        style = seg.segment([image], channel_axis=0, compute_masks=False, estimate_diameters=False)[0].style
        estimates[label] = (report.size_model.style_diameter(style), median_diameter(labels))
    # held-out images: nuclei 27 px, 3T3 cells 72 px; the style estimate alone (12 crops of 256 px) is within
    # 35 % (measured: 29.3 and 49.3 px) and keeps them apart
    assert estimates["3t3"][0] > 1.5 * estimates["hela"][0]
    for est, true in estimates.values():
        assert est == pytest.approx(true, rel=0.35)
