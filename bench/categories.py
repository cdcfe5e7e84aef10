"""The development categories and the dataset folders (../shared/datasets, MVTec AD layout) that hold them, free
of hdm's imports like bench/timing.py, so that every bench names them from one table."""

from __future__ import annotations

import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# category -> its dataset's folder under DATASETS, in the order the tables list them
FOLDERS = {"bottle": "mvtec_ad", "metal_plate": "mpdd", "magnetic_tile": "magnetic_tile", "brain_flair": "lgg_mri"}
CATEGORIES = tuple(FOLDERS)


def category_root(category: str, datasets: Path = DATASETS) -> Path:
    """The dataset root that holds `category`: what `DataSource.detect` and `hdm fit --data` take beside it."""
    return datasets / FOLDERS[category]


def category_folder(category: str, datasets: Path = DATASETS) -> Path:
    """The category's own folder (train/, test/, ground_truth/): the one that is absent where the data is."""
    return category_root(category, datasets) / category


def data_root(category: str) -> Path:
    """`category_root`, or the bench stops with a line naming the missing folder."""
    if not category_folder(category).is_dir():
        sys.exit(f"bench: {category_folder(category)} not found")
    return category_root(category)
