"""DeepBacs bacterial segmentation sets (Zenodo): source/target TIFF pairs."""

from __future__ import annotations

from pathlib import Path

from data_prep.sources.base import Download
from data_prep.sources.pairs import LabelPairSource

_Z = "https://zenodo.org/record/"


class DeepBacs(LabelPairSource):
    name = "deepbacs"
    title = "DeepBacs bacteria (mixed StarDist set: brightfield + fluorescence; E. coli stationary phase)"
    license = "unconfirmed (Zenodo records, CC BY 4.0 likely)"
    size = "tens of MB per archive"
    homepage = "https://github.com/HenriquesLab/DeepBacs"
    downloads = (
        Download(
            _Z + "5551009/files/DeepBacs_Data_Segmentation_StarDist_MIXED_dataset.zip",
            "DeepBacs_Data_Segmentation_StarDist_MIXED_dataset.zip",
            "2730e6b391637d6dc05bbc7b8c915fd8184d835ac3611e13f23ac6f10f86c2a0",
        ),
    )
    layout = """
    <any>/training/source/*.tif + <any>/training/target/*.tif (same names) -> train
    <any>/test/source/*.tif + <any>/test/target/*.tif -> test (Cellpose-SAM benchmark)
    E. coli stationary phase: <any>/{training,test}/brightfield/*.tif + .../masks/*.tif
    the mixed set is the union of the per-species sets: convert only one of them
    """
    roots = (
        ("**/training/source", "train"),
        ("**/test/source", "test"),
        ("**/training/brightfield", "train"),
        ("**/test/brightfield", "test"),
    )
    image_patterns = ("*.tif", "*.tiff")
    channel_names = "as stored"

    def mask_for(self, image: Path) -> Path:
        sub = "target" if image.parent.name == "source" else "masks"
        return image.parent.parent / sub / image.name
