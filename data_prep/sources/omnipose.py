"""Omnipose training data (bacterial phase/fluorescence, worms) from OSF xmury."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsam.io import read_image, read_labels
from data_prep.labels import split_disconnected
from data_prep.sources.base import Download, Example, Item
from data_prep.sources.pairs import LabelPairSource


class Omnipose(LabelPairSource):
    name = "omnipose"
    title = "Omnipose bacteria (bact_phase, bact_fluor) and worm sets"
    license = "unconfirmed (OSF project xmury)"
    size = "~ few GB zipped"
    homepage = "https://osf.io/xmury/"
    downloads = (
        Download(
            "https://files.osf.io/v1/resources/xmury/providers/osfstorage/62f56c035775130690f25481/?zip=",
            "omnipose_datasets.zip",
        ),
    )  # zipped on the fly by OSF: no stable checksum
    layout = """
    [data/]bact_phase/{train_sorted,test_sorted}/<sub>/NAME.tif + NAME_masks.tif
    [data/]bact_fluor/{train_sorted,test_sorted}/...  ; [data/]worm/{train,test}/... ; worm_high_res/...
    *_flows.tif files are ignored. An id painted on several separate regions (ncolor masks) is split
    into one object per region (fragments under 25% of the largest region keep the id).
    """
    roots = tuple(
        (f"**/{s}/{d}", sp)
        for s in ("bact_phase", "bact_fluor")
        for d, sp in (("train_sorted", "train"), ("test_sorted", "test"))
    ) + tuple((f"**/{s}/{d}", d) for s in ("worm", "worm_high_res") for d in ("train", "test"))
    image_patterns = ("*.tif", "*.tiff", "*.png")
    exclude = ("_masks.tif", "_masks.tiff", "_masks.png", "_flows.tif", "_flows.tiff", "_flows.png")
    recursive = True
    channel_names = "as stored"

    def mask_for(self, image: Path) -> Path:
        for suffix in (image.suffix, ".tif", ".png"):
            cand = image.with_name(f"{image.stem}_masks{suffix}")
            if cand.exists():
                return cand
        return image.with_name(f"{image.stem}_masks{image.suffix}")

    def load(self, raw: Path, item: Item) -> Example:
        image, labels = read_image(raw / item.ref[0]), read_labels(raw / item.ref[1])
        labels = split_disconnected(labels)  # ncolor masks reuse ids for separate cells
        return Example(image, np.asarray(labels))
