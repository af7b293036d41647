"""Canonical datasets from ../shared/data (the project's small real annotated set), split by image.

    python scripts/prepare_shared_data.py [OUT=runs/shared_canonical] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.shared_data import build_shared_datasets

if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/shared_canonical")
    parser.add_argument("--shared", default=str(repo.parent / "shared" / "data"))
    args = parser.parse_args()
    if not Path(args.shared).is_dir():
        sys.exit(f"{args.shared}: the shared data folder is absent")
    for root in build_shared_datasets(args.shared, args.out):
        print(root)
