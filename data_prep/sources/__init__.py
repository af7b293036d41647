"""Registry of dataset converters: `SOURCES[name]` is a Source class, `get_source(name)` an instance."""

from __future__ import annotations

from data_prep.sources.base import Download, Example, Item, LayoutError, Source
from data_prep.sources.bbbc import BBBC038, BBBC039
from data_prep.sources.bccd import BCCD
from data_prep.sources.cellpose import Cyto2, Nuclei
from data_prep.sources.conic import CoNIC
from data_prep.sources.cpm import CPM15, CPM17
from data_prep.sources.ctc import CTC
from data_prep.sources.deepbacs import DeepBacs
from data_prep.sources.folder import Folder, SegNpy
from data_prep.sources.ihc_tma import IHCTMA
from data_prep.sources.livecell import LIVECell
from data_prep.sources.lynsec import LyNSeC
from data_prep.sources.monusac import MoNuSAC
from data_prep.sources.monuseg import MoNuSeg
from data_prep.sources.neurips22 import NeurIPS22
from data_prep.sources.nuinsseg import CryoNuSeg, NuInsSeg
from data_prep.sources.omnipose import Omnipose
from data_prep.sources.pannuke import PanNuke
from data_prep.sources.tissuenet import TissueNet
from data_prep.sources.tnbc import TNBC
from data_prep.sources.yeaz import YeaZ

SOURCES: dict[str, type[Source]] = {
    cls.name: cls
    for cls in (
        Cyto2,
        Nuclei,
        TissueNet,
        LIVECell,
        Omnipose,
        YeaZ,
        DeepBacs,
        NeurIPS22,
        MoNuSeg,
        MoNuSAC,
        CryoNuSeg,
        NuInsSeg,
        BCCD,
        CPM15,
        CPM17,
        TNBC,
        LyNSeC,
        IHCTMA,
        CoNIC,
        PanNuke,
        CTC,
        BBBC038,
        BBBC039,
        Folder,
        SegNpy,
    )
}


def get_source(name: str, **kwargs) -> Source:
    """An instance of the converter registered as `name` (kwargs go to its constructor, e.g. split)."""
    if name not in SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](**kwargs)


__all__ = ["SOURCES", "Download", "Example", "Item", "LayoutError", "Source", "get_source"]
