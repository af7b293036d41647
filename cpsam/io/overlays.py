"""Pictures of a segmentation: mask outlines, flows as colours, an image with outlines painted on it (uint8 RGB)."""

from __future__ import annotations

import numpy as np


def masks_to_outlines(masks: np.ndarray) -> np.ndarray:
    """Boundary pixels of a (H, W) label image: bool (H, W).

    A pixel of mask k is on its outline when one of its 4 neighbours is not k (another mask,
    background, or outside the image): the border points that cellpose's per-mask
    `cv2.findContours` traces for hole-free masks (what the dynamics produce).
    """
    masks = np.asarray(masks)
    padded = np.pad(masks, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(masks.shape, bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= neighbour != centre
    return edge & (masks > 0)


def _percentile_uint8(channel: np.ndarray) -> np.ndarray:
    """1st-99th percentile scaling of one (H, W) channel to uint8 (clipped), zeros for a flat channel."""
    from cpsam.transforms import normalize_percentile  # torch comes with it: only when a picture is made

    scaled = normalize_percentile(np.asarray(channel)[:, :, None])[..., 0]
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def flows_to_rgb(dP: np.ndarray) -> np.ndarray:
    """Colour wheel picture of (2, H, W) flows [dY, dX] -> uint8 (H, W, 3), as the cellpose GUI shows.

    Brightness is the flow magnitude scaled by its 1st/99th percentiles; hue is the flow angle
    (atan2(dX, dY)), mapped to three cosines 120 degrees apart.
    """
    from cpsam.transforms import normalize_percentile  # torch comes with it: only when a picture is made

    magnitude = np.sqrt(np.sum(np.asarray(dP, np.float32) ** 2, axis=0))
    brightness = 255 * np.clip(normalize_percentile(magnitude[:, :, None])[..., 0], 0, 1.0) / 2
    angle = np.arctan2(dP[1], dP[0]) + np.pi
    rgb = np.zeros((*magnitude.shape, 3), np.uint8)
    for c in range(3):
        rgb[..., c] = np.clip(brightness * (np.cos(angle + 2 * np.pi * c / 3) + 1), 0, 255).astype(np.uint8)
    return rgb


def display_rgb(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """An image as uint8 (H, W, 3) for overlays: grey for 1 channel, [c0, c1, 0] for 2, the first
    three channels otherwise; each channel scaled by its 1st/99th percentiles."""
    from cpsam.transforms import to_channels_last  # torch comes with it: only when a picture is made

    hwc = to_channels_last(np.asarray(image), channel_axis)
    planes = [_percentile_uint8(hwc[..., c]) for c in range(min(3, hwc.shape[-1]))]
    if len(planes) == 1:
        planes = planes * 3
    elif len(planes) == 2:
        planes.append(np.zeros_like(planes[0]))
    return np.stack(planes, axis=-1)


def outline_overlay(image: np.ndarray, masks: np.ndarray, color: tuple[int, int, int] = (255, 0, 0),
                    channel_axis: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3): the image (see `display_rgb`) with mask outlines painted in `color`."""
    rgb = display_rgb(image, channel_axis)
    if rgb.shape[:2] != masks.shape:
        raise ValueError(f"image {rgb.shape[:2]} and masks {masks.shape} differ in size")
    rgb[masks_to_outlines(masks)] = color
    return rgb
