"""YeaZ yeast gold standard (brightfield and phase contrast)."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.sources.base import rel
from data_prep.sources.pairs import LabelPairSource


class YeaZ(LabelPairSource):
    name = "yeaz"
    title = "YeaZ yeast brightfield + phase-contrast gold standard"
    license = "unconfirmed"
    size = "two tar.gz archives (Google Drive)"
    homepage = "https://www.epfl.ch/labs/lpbs/data-and-software/"
    manual = """  Google Drive (no public direct URL that survives quota limits):
  1. https://drive.google.com/file/d/14MUIN26ou0L12UC9UV_AC2S3isj1qBMY -> gold-standard-PhC-plus-2.tar.gz
  2. https://drive.google.com/file/d/1Sot3bau0F0dsBjRxoQzdGOeUy_wMezal -> gold-standard-BF-V-1.tar.gz
  3. tar xzf both into RAW, then: cpsam prep convert yeaz --raw RAW --out OUT"""
    layout = """
    gold-standard-PhC-plus-2/*_im.tif + *_mask.tif ; gold-standard-BF-V-1/*_im.tif + *_mask.tif
    no official split: 10% val chosen by a hash of the movie name (trailing frame numbers removed)
    """
    roots = (("**/gold-standard-PhC*", "hash"), ("**/gold-standard-BF*", "hash"))
    image_patterns = ("*_im.tif", "*_im.tiff")
    channel_names = "brightfield or phase"

    def mask_for(self, image: Path) -> Path:
        return image.with_name(image.name.replace("_im.", "_mask."))

    def split_key(self, image: Path, raw: Path) -> str:
        return re.sub(r"[_-]?\d+_im$", "", rel(image.with_suffix(""), raw))
