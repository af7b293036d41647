"""Cell Tracking Challenge 2D training sets: gold SEG frames (partial annotation!)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from cpsam.io import read_image, read_labels
from data_prep.sources.base import Download, Example, Item, LayoutError, Source, rel

_CTC = "http://data.celltrackingchallenge.net/training-datasets/"
_SHA = {
    "BF-C2DL-HSC": "0aa68ec37a9b06e72a5dfa07d809f56e1775157fb674bb75ff904936149657b1",
    "BF-C2DL-MuSC": "ca72b59042809120578a198ba236e5ed3504dd6a122ef969428b7c64f0a5e67d",
    "DIC-C2DH-HeLa": "832fed2d05bb7488cf9c51a2994b75f8f3f53b3c3098856211f2d39023c34e1a",
    "Fluo-C2DL-Huh7": "1912658c1b3d8b38b314eb658b559e7b39c256917150e9b3dd8bfdc77347617d",
    "Fluo-C2DL-MSC": "a083521f0cb673ae02d4957c5e6580c2e021943ef88101f6a2f61b944d671af2",
    "Fluo-N2DH-GOWT1": "1a7bd9a7d1d10c4122c7782427b437246fb69cc3322a975485c04e206f64fc2c",
    "Fluo-N2DH-SIM+": "3e809148c87ace80c72f563b56c35e0d9448dcdeb461a09c83f61e93f5e40ec8",
    "Fluo-N2DL-HeLa": "35dd99d58e071aba0b03880128d920bd1c063783cc280f9531fbdc5be614c82e",
    "PhC-C2DH-U373": "b18185c18fce54e8eeb93e4bbb9b201d757add9409bbf2283b8114185a11bc9e",
    "PhC-C2DL-PSC": "9d54bb8febc8798934a21bf92e05d92f5e8557c87e28834b2832591cdda78422",
}


class CTC(Source):
    name = "ctc"
    title = "Cell Tracking Challenge 2D training sets, gold-standard SEG frames"
    license = "CTC conditions of use (cite Maska et al. 2023; permission needed for non-CTC public use)"
    size = "10 2D datasets, 30 MB - 2 GB each"
    homepage = "http://celltrackingchallenge.net/2d-datasets/"
    downloads = tuple(Download(f"{_CTC}{k}.zip", f"{k}.zip", v) for k, v in _SHA.items())
    layout = """
    <NAME>/<seq>/tNNN.tif + <NAME>/<seq>_GT/SEG/man_segNNN.tif (seq = 01, 02; 3 or 4 digits)
    all SEG frames go to train (the official test sets have no GT). Gold SEG covers only part of the
    cells in many frames: where <seq>_GT/TRA/man_trackNNN.tif exists, cells whose TRA marker touches
    no SEG object are written to ignore/NAME.tif (marker grown by 3 px) so training can skip them.
    """
    channel_names = "as stored"

    def items(self, raw: Path) -> list[Item]:
        items = []
        for seg_dir in sorted(raw.glob("**/*_GT/SEG")):
            seq = seg_dir.parent.name[: -len("_GT")]
            dataset = seg_dir.parent.parent.name
            for seg in sorted(seg_dir.glob("man_seg*.tif")):
                m = re.fullmatch(r"man_seg(\d+)\.tif", seg.name)
                if not m:  # 3-D slice annotations man_seg_TTT_ZZZ.tif are not 2-D frames
                    continue
                frame = seg_dir.parent.parent / seq / f"t{m.group(1)}.tif"
                if not frame.exists():
                    raise LayoutError(frame, f"frame of {seg.name} is missing")
                items.append(
                    Item(
                        name=f"{dataset}_{seq}_t{m.group(1)}",
                        split="train",
                        ref=(rel(frame, raw), rel(seg, raw)),
                        source=rel(frame, raw),
                    )
                )
        if not items:
            raise LayoutError(
                raw / "<NAME>" / "01_GT" / "SEG", f"no SEG ground truth found; expected:\n{self.layout}"
            )
        return items

    def load(self, raw: Path, item: Item) -> Example:
        labels = read_labels(raw / item.ref[1])
        return Example(
            read_image(raw / item.ref[0]), labels, ignore=unannotated_cells(raw / item.ref[1], labels)
        )


def unannotated_cells(seg_path: Path, labels: np.ndarray, *, grow: int = 3) -> np.ndarray | None:
    """Ignore mask for the cells a partial SEG frame leaves out, from the matching TRA markers.

    Every TRA marker (`<seq>_GT/TRA/man_trackNNN.tif`, one per cell) that touches no SEG object marks
    an unannotated cell; its marker grown by `grow` px (not into annotated cells) is returned as a
    bool (H, W) mask, or None when there is no TRA file or every cell is annotated.
    """
    num = seg_path.stem[len("man_seg") :]
    tra = seg_path.parent.parent / "TRA" / f"man_track{num}.tif"
    if not tra.exists():
        return None
    markers = read_labels(tra)
    if markers.shape != labels.shape:
        raise LayoutError(tra, f"shape {markers.shape} differs from SEG {labels.shape}")
    ids = np.unique(markers[markers > 0])
    covered = np.unique(markers[(markers > 0) & (labels > 0)])
    missing = np.setdiff1d(ids, covered)
    if missing.size == 0:
        return None
    ignore = ndimage.binary_dilation(np.isin(markers, missing), iterations=grow) & (labels == 0)
    return ignore
