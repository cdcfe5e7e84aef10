"""Where the samples are: the dataset layouts users already have.

- MVTec AD and its look-alikes (MPDD, BTAD): `<root>/<category>/train/good|ok`, `test/<type>`,
  `ground_truth/<type>/<stem>[_mask].<ext>`;
- VisA with its one-class split: `<root>/split_csv/1cls.csv` (object, split, label, image, mask);
- a generic set of folders: normal, optional abnormal, optional masks, optional normal test;
- a plain folder of normal images (enough to fit).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._data import IMAGE_EXTENSIONS, HDMInputError, Sample, list_images

NORMAL_NAMES = ("good", "ok")
VISA_COLUMNS = {"object", "split", "label", "image", "mask"}


def mask_index(folder: Path) -> dict[str, Path]:
    """Masks in `folder` by the stem of the image they belong to (`<stem>_mask.*` preferred to `<stem>.*`)."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem.endswith("_mask"):
            index[path.stem[: -len("_mask")]] = path
        else:
            index.setdefault(path.stem, path)
    return index


def mvtec_samples(root: Path, category: str, split: str) -> list[Sample]:
    """Samples of one category in the MVTec AD layout (also MPDD and BTAD)."""
    base = root / category
    if not base.is_dir():
        raise HDMInputError(f"{base}: category folder not found")
    split_dir = base / split
    if not split_dir.is_dir():
        raise HDMInputError(f"{split_dir}: no '{split}' split in this dataset")
    samples = []
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if type_dir.name in NORMAL_NAMES:
            samples += [Sample(p, 0) for p in list_images(type_dir)]
            continue
        masks = mask_index(base / "ground_truth" / type_dir.name)
        for image_path in list_images(type_dir):
            if image_path.stem not in masks:
                raise HDMInputError(f"{image_path}: defect image has no mask (looked for "
                                    f"{base / 'ground_truth' / type_dir.name / image_path.stem}_mask.png)")
            samples.append(Sample(image_path, 1, masks[image_path.stem], type_dir.name))
    if not samples:
        raise HDMInputError(f"{split_dir}: no images found")
    return samples


def visa_samples(root: Path, category: str, split: str) -> list[Sample]:
    """Samples of one VisA object from `split_csv/1cls.csv`; masks: any non-zero value is defect."""
    table = root / "split_csv" / "1cls.csv"
    try:
        with table.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = VISA_COLUMNS - set(reader.fieldnames or [])
            if missing:
                raise HDMInputError(f"{table}: missing columns {', '.join(sorted(missing))}")
            rows = [r for r in reader if r["object"] == category and r["split"] == split]
    except FileNotFoundError:
        raise HDMInputError(f"{table}: VisA split file not found") from None
    samples = []
    for row in rows:
        image = root / row["image"]
        if row["label"] == "normal":
            samples.append(Sample(image, 0))
        elif row["label"] == "anomaly":
            if not row["mask"]:
                raise HDMInputError(f"{image}: defect image has no mask in {table}")
            samples.append(Sample(image, 1, root / row["mask"], "anomaly", mask_nonzero=True))
        else:
            raise HDMInputError(f"{table}: label {row['label']!r} for {row['image']} is neither normal nor anomaly")
    if not samples:
        raise HDMInputError(f"{table}: no '{split}' rows for object {category!r}")
    return samples


def categories(root: Path) -> list[str]:
    """Every category of a data root: VisA's objects, or the folders with a train split (MVTec-like)."""
    table = root / "split_csv" / "1cls.csv"
    if table.is_file():
        with table.open(newline="") as handle:
            found = sorted({row.get("object", "") for row in csv.DictReader(handle)} - {""})
    elif root.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    else:
        raise HDMInputError(f"{root}: data folder not found")
    if not found:
        raise HDMInputError(f"{root}: no categories in it (MVTec-like <category>/train folders or VisA's split_csv)")
    return found


@dataclass(frozen=True)
class DataSource:
    """One dataset, whatever its layout; serialised into the run so `hdm test` finds it again."""

    layout: str  # mvtec | visa | folders
    root: Path | None = None
    category: str | None = None
    normal_dir: Path | None = None
    abnormal_dir: Path | None = None
    mask_dir: Path | None = None
    normal_test_dir: Path | None = None

    @classmethod
    def detect(cls, root: Path, category: str | None) -> "DataSource":
        """MVTec-like or VisA when a category is given; otherwise a plain folder of normal images."""
        if category is None:
            return cls("folders", normal_dir=root)
        if (root / "split_csv" / "1cls.csv").is_file():
            return cls("visa", root=root, category=category)
        return cls("mvtec", root=root, category=category)

    def train_samples(self) -> list[Sample]:
        if self.layout == "mvtec":
            samples = [s for s in mvtec_samples(self.root, self.category, "train") if s.label == 0]
        elif self.layout == "visa":
            samples = [s for s in visa_samples(self.root, self.category, "train") if s.label == 0]
        else:
            samples = [Sample(p, 0) for p in list_images(self.normal_dir)]
        if not samples:
            raise HDMInputError(f"{self.describe()}: no normal training images found")
        return samples

    def test_samples(self) -> list[Sample]:
        if self.layout == "mvtec":
            return mvtec_samples(self.root, self.category, "test")
        if self.layout == "visa":
            return visa_samples(self.root, self.category, "test")
        if self.abnormal_dir is None or self.normal_test_dir is None:
            raise HDMInputError(f"{self.describe()}: testing needs --abnormal-dir and --normal-test-dir")
        masks = mask_index(self.mask_dir) if self.mask_dir else {}
        samples = [Sample(p, 0) for p in list_images(self.normal_test_dir)]
        for path in list_images(self.abnormal_dir):
            if path.stem not in masks:
                raise HDMInputError(f"{path}: defect image has no mask in {self.mask_dir or '(no --mask-dir given)'}")
            samples.append(Sample(path, 1, masks[path.stem], "defect"))
        return samples

    def describe(self) -> str:
        if self.layout == "folders":
            return str(self.normal_dir)
        return f"{self.root} ({self.category})"

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataSource":
        paths = {"root", "normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir"}
        return cls(**{k: (Path(v) if k in paths and v is not None else v) for k, v in data.items()})


def holdout_split(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, holdout): a seeded random `fraction` (at least 2 images) kept out of training for calibration."""
    n_holdout = max(2, round(fraction * len(paths)))
    if len(paths) - n_holdout < 1:
        raise HDMInputError(f"{paths[0].parent}: {len(paths)} normal images are too few (calibration holds out "
                            f"{n_holdout} and training needs at least 1)")
    # A generator of its own, so the split never shifts the training randomness.
    order = np.random.default_rng([seed, 7919]).permutation(len(paths))
    held = set(order[:n_holdout].tolist())
    return ([p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held])
