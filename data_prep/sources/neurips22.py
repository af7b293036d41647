"""NeurIPS 2022 Cell Segmentation Challenge (Zenodo 10719375): label TIFF per image."""

from __future__ import annotations

from pathlib import Path

from data_prep.sources.base import Download
from data_prep.sources.pairs import LabelPairSource

_Z = "https://zenodo.org/records/10719375/files/"


class NeurIPS22(LabelPairSource):
    name = "neurips22"
    title = "NeurIPS 2022 Cell Segmentation Challenge (multi-modality)"
    license = "see Zenodo record 10719375 (unconfirmed); research use"
    size = "1,000 labelled training + tuning + test images; Training-labeled.zip ~ GBs"
    homepage = "https://neurips22-cellseg.grand-challenge.org"
    downloads = (
        Download(
            _Z + "Training-labeled.zip",
            "Training-labeled.zip",
            "b2383929eb8e99b2716fa0d4e2f6e03983e626a57cf00fe85175869c54aa3592",
        ),
        Download(
            _Z + "Tuning.zip",
            "Tuning.zip",
            "849423d36bb8fcc2d91a5b189a3b6d93c3d4071c9701eaaa44ba393a510459c4",
        ),
        Download(
            _Z + "Testing.zip",
            "Testing.zip",
            "3379730221f43830d30fddf131750e967c9c9bdf04f98811e852a050eb659ccc",
        ),
    )
    layout = """
    Training-labeled/ (or Train_Labeled/) images/cell_XXXXX.{png,tif,tiff,bmp}
      + labels/cell_XXXXX_label.tiff -> train
    Tuning/images, Tuning/labels -> val ;  Testing/Public/images, Testing/Public/labels -> test
    """
    roots = (
        ("Training-labeled/images", "train"),
        ("Train_Labeled/images", "train"),
        ("Tuning/images", "val"),
        ("Testing/Public/images", "test"),
    )
    image_patterns = ("*.png", "*.tif", "*.tiff", "*.bmp")
    channel_names = "as stored (gray or RGB)"

    def mask_for(self, image: Path) -> Path:
        return image.parent.parent / "labels" / f"{image.stem}_label.tiff"

    def items(self, raw):
        # names without the "images" folder: Training-labeled_cell_00001
        out = super().items(raw)
        return [
            type(it)(name=it.name.replace("_images_", "_"), split=it.split, ref=it.ref, source=it.source)
            for it in out
        ]
