"""data_prep: raw public datasets -> the canonical dataset format used by train, distill and eval.

data_prep.canonical   the format (images/, masks/, flows/, ignore/, index.csv) and its reader
                      `CanonicalDataset(root, split=..., datasets=...)`
data_prep.sources     one converter per source dataset (`SOURCES`, `get_source(name)`)
data_prep.convert     runs a converter: parallel, progress bar, idempotent, resumable
data_prep.download    resumable, sha256-verified, atomic downloads; safe extraction
data_prep.labels      label algebra shared by converters (relabel, diameters, polygons, overlaps)
data_prep.flows       fills the flow cache with cpsam.dynamics
data_prep.synthetic   synthetic fluorescence / phase-contrast cells with masks
data_prep.timelapse   random frames x random crops from time-lapse stacks
data_prep.subimages   tiles or per-cell windows of large images
data_prep.cli         the `cpsam prep` command
"""
