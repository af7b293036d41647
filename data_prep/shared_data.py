"""Canonical datasets made from the project's small real annotated set (../shared/data, MANIFEST.md there).

One canonical folder per source folder, split by image (never by tile of one image, so no
validation pixels leak into training): in folders with two or more images the last image in name
order is the validation image, the others train. Folders whose annotations are partial
(CryoNuSeg WIP, white cells only) are train-only, since they cannot score precision. The flow cache
is filled, so training does not compute flows on the fly.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpsam.io import read_image, read_labels
from data_prep.canonical import to_chw, write_example, write_index
from data_prep.flows import fill_flow_cache

# folder -> dataset name; partial annotations are never used for validation
FOLDERS: dict[str, str] = {
    "fluo_nuclei_ctc_N2DL-HeLa": "hela",
    "fluo_nuclei_deepcell2016": "deepcell",
    "phase_ctc_U373": "u373",
    "phase_usiigaci_3t3": "3t3",
    "tissue_multiplex_neurips22": "tissuenet_like",
    "bact_phase_neurips22": "bact_phase",
    "bact_bf_mothermachine_baby": "baby",
    "he_miccai2015_cpm": "cpm15",
    "he_gbm40_emory": "gbm40",
    "he_cryonuseg_wip_partial": "cryonuseg_partial",
    "brightfield_blood_neurips22_wbc_only": "wbc_only",
}
TRAIN_ONLY = {"he_cryonuseg_wip_partial", "brightfield_blood_neurips22_wbc_only"}


def build_shared_datasets(
    shared_data: str | os.PathLike[str], out: str | os.PathLike[str], folders: list[str] | None = None,
    flows: bool = True,
) -> list[Path]:
    """Write one canonical dataset per folder of `shared_data` under `out`; returns the dataset folders.

    Existing complete datasets (index.csv present) are kept as they are.
    """
    src, dst = Path(shared_data), Path(out)
    made = []
    for folder in folders or list(FOLDERS):
        root = dst / FOLDERS[folder]
        made.append(root)
        if (root / "index.csv").is_file():
            continue
        pairs = sorted(src.joinpath(folder).glob("*_img.tif"))
        if not pairs:
            raise FileNotFoundError(f"{src / folder}: no NAME_img.tif files")
        rows = []
        for i, img_path in enumerate(pairs):
            name = img_path.name[: -len("_img.tif")]
            split = "val" if (len(pairs) > 1 and i == len(pairs) - 1 and folder not in TRAIN_ONLY) else "train"
            image = to_chw(read_image(img_path), path=img_path)
            labels = read_labels(img_path.with_name(f"{name}_masks.tif"))
            rows.append(write_example(root, name, image, labels, dataset=FOLDERS[folder], split=split,
                                      license="see ../shared/data/MANIFEST.md", source=f"{folder}/{img_path.name}"))
        write_index(root, rows)
        if flows:
            fill_flow_cache(root, progress=False)
    return made
