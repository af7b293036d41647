"""CPM-15 and CPM-17 (MICCAI digital-pathology nuclei): .mat `inst_map` or the ASCII `_mask.txt`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from cpsam.io import read_image
from data_prep.sources.base import Example, Item, LayoutError
from data_prep.sources.pairs import LabelPairSource

_DRIVE = "https://drive.google.com/drive/folders/"


def _drive_manual(folder_id: str, name: str) -> str:
    """The steps to fetch a HoVer-Net release folder from Google Drive and convert it as source `name`."""
    return (f'  Google Drive folder (HoVer-Net release), manual "Download folder as zip":\n  {_DRIVE}{folder_id}\n'
            f"  unzip into RAW, then: cpsam prep convert {name} --raw RAW --out OUT")


def read_inst_map(path: Path) -> np.ndarray:
    """The `inst_map` array of a MATLAB v5 .mat file, or the labels of a CPM-15 ASCII `_mask.txt`
    (first line "W H", then W*H ids with x fastest). Raises LayoutError naming the file."""
    if path.suffix == ".txt":
        try:
            tokens = path.read_text().split()
            w, h = int(tokens[0]), int(tokens[1])
            values = np.asarray(tokens[2:], dtype=np.int64)
        except (ValueError, IndexError) as exc:
            raise LayoutError(path, f"not a CPM mask text file ({exc})") from exc
        if values.size != w * h:
            raise LayoutError(path, f"header says {w}x{h} = {w * h} ids, file has {values.size}")
        return values.reshape(h, w)
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5)
        raise LayoutError(path, "MATLAB v7.3 files are not supported; re-save with -v7") from exc
    except (ValueError, OSError) as exc:
        raise LayoutError(path, f"cannot read .mat ({exc})") from exc
    if "inst_map" not in mat:
        raise LayoutError(
            path, f"no 'inst_map' in .mat (keys: {sorted(k for k in mat if not k.startswith('__'))})"
        )
    return np.asarray(mat["inst_map"]).astype(np.int64)


class CPM15(LabelPairSource):
    name = "cpm15"
    title = "CPM-15 H&E nuclei (15 TCGA tiles, 20x and 40x)"
    license = "unconfirmed (MICCAI 2015 challenge, TCGA-derived)"
    size = "15 images, ~2.9k nuclei"
    homepage = "https://github.com/vqdang/hover_net"
    manual = _drive_manual("11ko-GcDsPpA9GBHuCtl_jNzWQl6qY_-I", "cpm15")
    layout = """
    cpm15/Images/*.png + cpm15/Labels/<stem>.mat (key inst_map)   (HoVer-Net copy), or
    imageXX.png + imageXX_mask.txt (original release: "W H" then ids, x fastest)
    no official split: 10% val by a hash of the image name
    """
    roots = (("**/Images", "hash"), (".", "hash"))
    image_patterns = ("*.png",)
    exclude = ("_poly.png",)
    channel_names = "R,G,B"

    def mask_for(self, image: Path) -> Path:
        if image.parent.name == "Images":
            return image.parent.parent / "Labels" / f"{image.stem}.mat"
        return image.with_name(f"{image.stem}_mask.txt")

    def load(self, raw: Path, item: Item) -> Example:
        image = read_image(raw / item.ref[0])
        return Example(image[..., :3] if image.ndim == 3 else image, read_inst_map(raw / item.ref[1]))


class CPM17(CPM15):
    name = "cpm17"
    title = "CPM-17 H&E nuclei (32 train + 32 test tiles)"
    size = "64 images, ~7.6k nuclei"
    manual = _drive_manual("1sJ4nmkif6j4s2FOGj8j6i_Ye7z9w0TfA", "cpm17")
    layout = """
    cpm17/{train,test}/Images/*.png + cpm17/{train,test}/Labels/<stem>.mat (key inst_map)
    """
    roots = (("**/train/Images", "train"), ("**/test/Images", "test"))
