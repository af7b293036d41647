"""Cellpose cyto / cyto2 and nuclei training sets (cellpose.org, manual download)."""

from __future__ import annotations

from pathlib import Path

from data_prep.sources.pairs import LabelPairSource

_MANUAL = """  Registration/terms form on the web page, no public URL:
  1. open https://www.cellpose.org/dataset and accept the terms
  2. download train.zip, test.zip (cyto) and train_cyto2.zip (cyto2 extra images)
  3. unzip all into one folder RAW so that RAW/train, RAW/test, RAW/train_cyto2 exist
  4. cpsam prep convert cyto2 --raw RAW --out OUT"""


class Cyto2(LabelPairSource):
    name = "cyto2"
    title = "Cellpose cyto + cyto2 generalist set (mixed fluorescence / brightfield, RGB)"
    license = "non-commercial (cellpose.org terms)"
    size = "540 + 68 cyto images + ~800 cyto2 images, ~1 GB"
    homepage = "https://www.cellpose.org/dataset"
    manual = _MANUAL
    layout = """
    train/NNN_img.png + train/NNN_masks.png -> train
    train_cyto2/NNN_img.png + NNN_masks.png  -> train
    test/NNN_img.png + test/NNN_masks.png    -> test (Cellpose-SAM benchmark; keep out of training)
    image channels as stored: R = nucleus, G = cytoplasm, B = empty
    """
    roots = (("train", "train"), ("train_cyto2", "train"), ("test", "test"))
    image_patterns = ("*_img.png", "*_img.tif")
    channel_names = "nucleus,cytoplasm,empty"

    def mask_for(self, image: Path) -> Path:
        return image.with_name(image.name.replace("_img.", "_masks."))


class Nuclei(Cyto2):
    name = "nuclei"
    title = "Cellpose nuclei set (nuclear fluorescence + some H&E)"
    license = "unconfirmed (mixed third-party sources, partly not redistributable)"
    size = "~1,139 images"
    manual = """  Not publicly released (MouseLand/cellpose#240). If you obtained it from the authors, put
  RAW/train/NNN_img.png + NNN_masks.png (and RAW/test/...) and run
  cpsam prep convert nuclei --raw RAW --out OUT"""
    layout = """
    train/NNN_img.png + train/NNN_masks.png -> train ; test/... -> test
    """
    roots = (("train", "train"), ("test", "test"))
    channel_names = "as stored"
