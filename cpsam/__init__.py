"""cpsam: Cellpose-SAM reproduction and distillation.

The library (networks, weight loading, flow algebra, inference, I/O). Training, distillation,
data preparation and evaluation live in the sibling packages `train`, `distill`, `data_prep` and
`eval`, which import `cpsam` (never the other way round).
"""

__version__ = "0.1.0"
