"""Aperio ImageScope XML polygons (MoNuSeg, MoNuSAC): parse regions, rasterise with ids from 1."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.sources.base import LayoutError


@dataclass(frozen=True)
class Region:
    """One polygon: vertices (K, 2) float [x = column, y = row]; `group` = its Annotation's class name."""

    vertices: np.ndarray
    group: str


def read_regions(path: Path) -> list[Region]:
    """Every Annotation/Regions/Region polygon of an Aperio XML file, in document order.

    The class name of an Annotation is its `Attributes/Attribute/@Name` (MoNuSAC) or its `Name`.
    Raises LayoutError naming the file when it is missing or not valid XML.
    """
    if not path.exists():
        raise LayoutError(path, "annotation XML is missing")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise LayoutError(path, f"not valid XML ({exc})") from exc
    regions = []
    for ann in root.iter("Annotation"):
        attr = ann.find("Attributes/Attribute")
        group = attr.get("Name", "") if attr is not None else ann.get("Name", "")
        for reg in ann.iter("Region"):
            verts = [(float(v.get("X")), float(v.get("Y"))) for v in reg.iter("Vertex")]
            regions.append(Region(np.asarray(verts, np.float64).reshape(-1, 2), group))
    return regions
