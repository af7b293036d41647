"""train/degrade.py against cellpose 4.2.1.1's denoise.add_noise, on real crops normalized to [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose import denoise
from conftest import read_shared_image
from scipy import stats

from cpsam.transforms import normalize_percentile, to_channels_last
from train.degrade import (
    DegradeConfig,
    DegradeParams,
    degrade_batch,
    degrade_one,
    draw_degradation,
    percentile_normalize,
    poisson_counts,
)

CROPS = {  # name: (folder, image, top-left corner); 256 x 256 crops
    "he_rgb": ("he_gbm40_emory", "gbm40_01", (0, 0)),  # H&E, 3 channels
    "hela_gray": ("fluo_nuclei_ctc_N2DL-HeLa", "Fluo-N2DL-HeLa_01_t013", (200, 300)),  # fluorescence, 1 channel
    "multiplex": ("tissue_multiplex_neurips22", "neurips22_cell_00849", (128, 128)),  # 3 channels, R is empty
}


def crop(name: str) -> torch.Tensor:
    """(1, C, 256, 256) float32 crop, each channel normalized to its 1st-99th percentiles (cellpose's way)."""
    folder, image, (y, x) = CROPS[name]
    pixels = to_channels_last(read_shared_image(folder, image))
    normalized = normalize_percentile(pixels[y : y + 256, x : x + 256])
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))[None]


def assert_close_to_range(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-5) -> None:
    """max |ours - theirs| <= tolerance * (value range of theirs)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    value_range = float(theirs.max() - theirs.min())
    assert value_range > 0.5  # the comparison is not between two flat images
    assert float((ours - theirs).abs().max()) <= tolerance * value_range


def aniso_seed_for(ds: int, ds_max: int = 7) -> int:
    """A torch seed for which add_noise(iso=False) draws this ds (with iso=False it ignores its `ds` argument:
    its first torch draw is torch.randint(2, ds_max + 1) for the factor)."""
    for seed in range(1000):
        torch.manual_seed(seed)
        if int(torch.randint(2, ds_max + 1, size=(1,))) == ds:
            return seed
    raise AssertionError(f"no seed gives ds={ds}")


@pytest.mark.parametrize("name", ["he_rgb", "hela_gray"])
@pytest.mark.parametrize("sigma_y,sigma_x", [(2.5, 2.5), (4.0, 0.4), (9.3, 9.3)])
def test_blur_equals_add_noise(name: str, sigma_y: float, sigma_x: float) -> None:
    image = crop(name)
    theirs = denoise.add_noise(image.clone(), poisson=0.0, blur=1.0, downsample=0.0, sigma0=sigma_y, sigma1=sigma_x)
    ours = degrade_batch(image, [DegradeParams(blur=True, sigma_y=sigma_y, sigma_x=sigma_x)])
    assert_close_to_range(ours, theirs)
    assert float((ours - image).abs().max()) > 0.05  # the blur did something


@pytest.mark.parametrize("name", ["he_rgb", "hela_gray"])
@pytest.mark.parametrize("ds", [2, 3, 7])
def test_downsampling_equals_add_noise(name: str, ds: int) -> None:
    # add_noise always blurs downsampled images; sigma 1e-3 makes its kernel an exact delta (pure downsampling)
    image = crop(name)
    theirs = denoise.add_noise(image.clone(), poisson=0.0, blur=0.0, downsample=1.0, ds=ds, sigma0=1e-3, sigma1=1e-3)
    ours = degrade_batch(image, [DegradeParams(downsample=True, ds=ds)])
    assert_close_to_range(ours, theirs)


@pytest.mark.parametrize("ds", [2, 5])
def test_anisotropic_downsampling_equals_add_noise(ds: int) -> None:
    image = crop("he_rgb")
    for sigma_y, sigma_x, blur in ((1e-3, 1e-3, False), (2.0, 0.2, True)):
        torch.manual_seed(aniso_seed_for(ds))
        theirs = denoise.add_noise(image.clone(), poisson=0.0, blur=0.0, downsample=1.0, iso=False,
                                   sigma0=sigma_y, sigma1=sigma_x)
        params = DegradeParams(downsample=True, ds=ds, iso=False, blur=blur, sigma_y=sigma_y, sigma_x=sigma_x)
        assert_close_to_range(degrade_batch(image, [params]), theirs)


@pytest.mark.parametrize("name", ["he_rgb", "hela_gray"])
@pytest.mark.parametrize("ds,sigma", [(2, 1.2), (4, 3.0), (6, 7.5)])
def test_blur_then_downsampling_equals_add_noise(name: str, ds: int, sigma: float) -> None:
    image = crop(name)
    theirs = denoise.add_noise(image.clone(), poisson=0.0, blur=0.0, downsample=1.0, ds=ds, sigma0=sigma, sigma1=sigma)
    ours = degrade_batch(image, [DegradeParams(downsample=True, ds=ds, blur=True, sigma_y=sigma, sigma_x=sigma)])
    assert_close_to_range(ours, theirs)


@pytest.mark.parametrize("name", ["he_rgb", "hela_gray", "multiplex"])
def test_percentile_normalize_equals_img_norm(name: str) -> None:
    image = crop(name)
    continuous = torch.cat([image * 3.0 - 0.2, image ** 2])
    np.testing.assert_array_equal(percentile_normalize(continuous), denoise.img_norm(continuous.clone()))
    counts = torch.poisson(torch.cat([image, image]).clamp(min=0) * torch.tensor([2.0, 9.0])[:, None, None, None])
    ours = percentile_normalize(counts, integer_valued=True)
    np.testing.assert_array_equal(ours, denoise.img_norm(counts.clone()))
    np.testing.assert_array_equal(percentile_normalize(counts), ours)  # the histogram path = the topk path
    if name == "multiplex":  # the empty red channel has no percentile range: left as it is, like img_norm
        assert not ours[:, 0].any() and ours[:, 1:].amax() > 0.9


@pytest.mark.parametrize("rate", [0.05, 0.7, 3.0, 12.0, 40.0, 150.0])  # 150: above the numba kernel's range
def test_poisson_counts_have_the_poisson_distribution(rate: float) -> None:
    counts = poisson_counts(torch.full((3, 256, 256), rate), torch.Generator().manual_seed(7)).numpy().ravel()
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    values = np.arange(int(rate + 8 * np.sqrt(rate) + 8))
    pmf = stats.poisson.pmf(values, rate)
    frequency = np.bincount(counts.astype(np.int64), minlength=values.size)[: values.size] / counts.size
    standard_error = np.sqrt(pmf * (1 - pmf) / counts.size)
    keep = pmf > 1e-5
    assert np.all(np.abs(frequency - pmf)[keep] <= 5 * standard_error[keep] + 1e-6)


def test_poisson_counts_of_a_real_image_have_mean_and_variance_k_x() -> None:
    rates = 5.7 * crop("he_rgb")[0].clamp(min=0)
    residuals = torch.stack([poisson_counts(rates, torch.Generator().manual_seed(s)) - rates for s in range(24)])
    total_rate = float(rates.sum()) * 24
    # sum of (X - lam) has variance sum(lam); sum of ((X - lam)^2 - lam) has variance sum(lam + 2 lam^2)
    assert abs(float(residuals.double().sum())) <= 5 * np.sqrt(total_rate)
    excess = float((residuals.double() ** 2 - rates.double()).sum())
    assert abs(excess) <= 5 * np.sqrt(total_rate + 2 * 24 * float((rates.double() ** 2).sum()))
    again = poisson_counts(rates, torch.Generator().manual_seed(3))
    assert torch.equal(again, residuals[3] + rates)  # same generator seed, same draw


def test_poisson_output_statistics_equal_add_noise() -> None:
    n = 32
    image = crop("he_rgb")
    batch = image.expand(n, -1, -1, -1).contiguous()
    np.random.seed(0)
    torch.manual_seed(0)
    theirs = denoise.add_noise(batch.clone(), poisson=1.0, blur=0.0, downsample=0.0, pscale=4.0)
    ours = degrade_batch(batch, [DegradeParams(poisson=True, photon_scale=4.0, noise_seed=s) for s in range(n)])
    # samples are i.i.d. (each is re-normalized by its own random percentiles): per-sample statistics of each
    # channel and intensity decile, compared by a two-sample z-test over the n samples
    for c in range(3):
        edges = np.quantile(image[0, c].numpy(), np.linspace(0, 1, 11))
        bins = np.clip(np.searchsorted(edges, image[0, c].numpy().ravel(), side="right") - 1, 0, 9)
        for b in range(10):
            pixels = bins == b
            for statistic in (np.mean, np.var):
                a = statistic(ours[:, c].reshape(n, -1).numpy()[:, pixels], axis=1)
                t = statistic(theirs[:, c].reshape(n, -1).numpy()[:, pixels], axis=1)
                assert abs(a.mean() - t.mean()) <= 5 * np.sqrt((a.var() + t.var()) / n) + 1e-6
    assert float(ours.std(0).mean()) > 0.05  # it is noisy


def test_draw_degradation_frequencies_follow_add_noise() -> None:
    cfg = DegradeConfig()
    rng = np.random.default_rng(0)
    draws = [draw_degradation(rng, cfg, 30.0) for _ in range(20000)]
    done = [p for p in draws if p is not None]
    assert abs(len(done) / len(draws) - cfg.fraction) < 0.015
    n = len(done)

    def share(items: list[bool]) -> float:
        return sum(items) / len(items)

    assert abs(share([p.poisson for p in done]) - cfg.poisson_p) < 0.02
    assert abs(share([p.downsample for p in done]) - cfg.downsample_p) < 0.02
    assert all(p.blur for p in done if p.downsample)  # blur is forced for downsampled samples
    assert abs(share([p.blur for p in done if not p.downsample]) - cfg.blur_p) < 0.03
    assert abs(share([not p.iso for p in done]) - cfg.aniso_p) < 0.02
    ds = np.array([p.ds for p in done if p.downsample])
    assert set(ds) == set(range(2, cfg.ds_max + 1))
    assert np.abs(np.bincount(ds)[2:] / ds.size - 1 / (cfg.ds_max - 1)).max() < 0.02
    assert all(p.ds == 1 for p in done if not p.downsample)
    # photon scale: max(1, Gamma(shape 4, rate 0.7)); E = E[G] + E[(1 - G)+]
    gamma = stats.gamma(cfg.alpha, scale=1 / cfg.beta)
    grid = np.linspace(0, 1, 2001)
    expected = gamma.mean() + np.trapezoid((1 - grid) * gamma.pdf(grid), grid)
    scales = np.array([p.photon_scale for p in done])
    assert scales.min() >= 1.0 and abs(np.mean(scales == 1.0) - gamma.cdf(1.0)) < 0.01
    assert abs(scales.mean() - expected) < 5 * scales.std() / np.sqrt(n)


def test_draw_degradation_sigma_rules() -> None:
    rng = np.random.default_rng(1)
    done = [p for p in (draw_degradation(rng, DegradeConfig(fraction=1.0), 45.0) for _ in range(6000)) if p.blur]
    relative = 45.0 / 30.0
    iso = np.array([p.sigma_y / relative for p in done if p.iso])
    assert all(p.sigma_x == p.sigma_y for p in done if p.iso)
    assert iso.min() == pytest.approx(0.5) and iso.max() == pytest.approx(5.0)  # 5 * clip(0.5 * Exp(1), 0.1, 1)
    assert abs(np.mean(np.isclose(iso, 0.5)) - (1 - np.exp(-0.2))) < 0.02
    assert abs(np.mean(np.isclose(iso, 5.0)) - np.exp(-2.0)) < 0.02
    aniso = [p for p in done if not p.iso]
    assert all(p.sigma_x == pytest.approx(p.sigma_y / 10) for p in aniso)
    assert all(p.sigma_y == pytest.approx(1.5 * relative) for p in aniso if p.downsample)  # clip(ds + U, .05, 1.5)
    free = np.array([p.sigma_y / relative for p in aniso if not p.downsample])
    assert free.max() < 1.0 and abs(free.mean() - 0.5) < 0.05  # U(0, 1)
    uniform = DegradeConfig(fraction=1.0, uniform_blur=True, gblur=5.0, aniso_p=0.0)
    for p in (draw_degradation(rng, uniform, 30.0) for _ in range(400)):
        if p.downsample:
            assert p.sigma_y == pytest.approx(1.0 + 4.0 * p.ds / 10.0)  # gblur * (1/gblur + (1 - 1/gblur) ds/2/gblur)
        elif p.blur:
            assert 1.0 <= p.sigma_y <= 5.0 and p.sigma_x == p.sigma_y


def test_draw_degradation_is_replayable_and_scales_with_diameter() -> None:
    cfg = DegradeConfig(fraction=0.7)
    first = [draw_degradation(np.random.default_rng(s), cfg, 30.0) for s in range(300)]
    assert first == [draw_degradation(np.random.default_rng(s), cfg, 30.0) for s in range(300)]
    double = [draw_degradation(np.random.default_rng(s), cfg, 60.0) for s in range(300)]
    for a, b in zip(first, double, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert b.sigma_y == pytest.approx(2 * a.sigma_y) and b.sigma_x == pytest.approx(2 * a.sigma_x)
            assert (a.ds, a.poisson, a.photon_scale, a.noise_seed, a.iso) == (b.ds, b.poisson, b.photon_scale,
                                                                              b.noise_seed, b.iso)
    seeds = [p.noise_seed for p in first if p is not None]
    assert len(set(seeds)) == len(seeds)


def test_batch_is_deterministic_and_each_sample_independent_of_its_batch_mates() -> None:
    he, multiplex = crop("he_rgb"), crop("multiplex")
    images = torch.cat([he, multiplex, he, multiplex, he, he])
    linear = dict(downsample=True, ds=3, blur=True, sigma_y=2.0, sigma_x=2.0)
    params = [
        None,
        DegradeParams(poisson=True, photon_scale=3.0, noise_seed=11),
        DegradeParams(**linear, poisson=True, photon_scale=6.0, noise_seed=12),
        DegradeParams(**linear, poisson=True, photon_scale=6.0, noise_seed=13),  # shares a group with the one above
        DegradeParams(downsample=True, ds=4, iso=False, blur=True, sigma_y=1.5, sigma_x=0.15),
        DegradeParams(blur=True, sigma_y=5.0, sigma_x=5.0, poisson=True, photon_scale=1.0, noise_seed=14),
    ]
    before = images.clone()
    out = degrade_batch(images, params)
    assert torch.equal(images, before)  # the input is not modified
    assert out.shape == images.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.data_ptr() != images.data_ptr() and torch.equal(out[0], images[0])
    assert torch.equal(out, degrade_batch(images, params))
    for b, p in enumerate(params):
        assert torch.equal(out[b], degrade_one(images[b], p))
    assert not torch.equal(out[2], out[3])  # same linear part, different noise seeds
    array = degrade_one(images[2].numpy(), params[2])
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    np.testing.assert_array_equal(array, out[2].numpy())


def test_random_degradations_of_real_crops_stay_finite() -> None:
    rng = np.random.default_rng(5)
    cfg = DegradeConfig(fraction=1.0, aniso_p=0.5)
    for name in ("he_rgb", "hela_gray", "multiplex"):
        image = crop(name)
        for _ in range(5):
            params = draw_degradation(rng, cfg, float(rng.uniform(10, 90)))
            out = degrade_batch(image, [params])
            assert out.shape == image.shape and torch.isfinite(out).all()


def test_bad_input_gets_a_clear_error() -> None:
    image = crop("hela_gray")
    with pytest.raises(ValueError, match="one DegradeParams or None per image"):
        degrade_batch(image, [None, None])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        degrade_batch(image[0], [None])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        degrade_one(image, None)
    with pytest.raises(ValueError, match="fraction"):
        DegradeConfig(fraction=1.5)
    with pytest.raises(ValueError, match="ds_max"):
        DegradeConfig(ds_max=1)
    with pytest.raises(ValueError, match="ds must be"):
        DegradeParams(downsample=True, ds=1)
    with pytest.raises(ValueError, match="diameter"):
        draw_degradation(np.random.default_rng(0), DegradeConfig(), 0.0)
