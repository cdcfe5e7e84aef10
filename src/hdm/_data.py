"""Data contracts: reading images and masks, and finding samples in the layouts users have."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


class HDMInputError(Exception):
    """Bad input from the user: the message is one line that names the file and the problem."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 defective
    mask_path: Path | None = None
    defect_type: str = "good"
    mask_nonzero: bool = False  # VisA-style masks: any non-zero value is defect (else > 127)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Every image below `folder`, sorted; symlinked folders are not followed, so links cannot loop."""
    if not folder.is_dir():
        raise HDMInputError(f"{folder}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in sorted(filenames) if is_image(Path(dirpath) / name))
    return found


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring float images in [0, 1] and 16/32-bit integer images to 8 bits, keeping their range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f" and array.max(initial=0) <= 1.0:
        return np.clip(array * 255.0, 0, 255).astype(np.uint8)
    high = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(array.astype(np.float64) / high * 255.0, 0, 255).astype(np.uint8)


# JPEGs above this many pixels are decoded at a reduced scale (DCT scaling in the decoder), so a
# 6000x4000 photo never becomes a full bitmap in memory; the long side stays >= REDUCED_LONG_SIDE.
LARGE_IMAGE_PIXELS = 12_000_000
REDUCED_LONG_SIDE = 2048
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def decode_image(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode any common image into (H'xW'x3 uint8 RGB pixels, the image's own (H, W)).

    EXIF orientation is applied to both. H'xW' equals (H, W) except for very large JPEGs, which
    are decoded at a reduced scale. Animated images give their first frame.
    """
    try:
        if path.stat().st_size == 0:
            raise HDMInputError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "JPEG" and width * height > LARGE_IMAGE_PIXELS:
                scale = REDUCED_LONG_SIDE / max(width, height)
                img.draft(img.mode, (max(1, int(width * scale)), max(1, int(height * scale))))
            if img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                gray = to_uint8(np.asarray(img))
                array = np.repeat(gray[..., None], 3, axis=2)
            else:
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA").convert("RGB")
                array = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise HDMInputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise HDMInputError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    if height < 8 or width < 8:
        raise HDMInputError(f"{path}: image is {width}x{height}, too small (at least 8x8)")
    return np.ascontiguousarray(array), (height, width)


def load_image(path: Path) -> np.ndarray:
    """Decode an image into HxWx3 uint8 RGB (reduced for very large JPEGs, see `decode_image`)."""
    return decode_image(path)[0]


def load_mask(path: Path, shape: tuple[int, int], nonzero: bool = False) -> np.ndarray:
    """Read a ground-truth mask as a boolean HxW array matching the image's (H, W).

    Masks are binarised at half range (anti-aliased or JPEG-saved 0/255 masks stay clean), or at
    any non-zero value for layouts that store labels as small integers. A mask at another
    resolution with the image's aspect ratio is resized; any other shape is refused, since it
    almost always means the mask belongs to another image.
    """
    try:
        if path.stat().st_size == 0:
            raise HDMInputError(f"{path}: mask is an empty file (0 bytes)")
        with Image.open(path) as img:
            array = np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise HDMInputError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise HDMInputError(f"{path}: mask is not a readable image ({exc.__class__.__name__})") from None
    if array.shape != shape:
        if abs(array.shape[1] / array.shape[0] - shape[1] / shape[0]) > 0.01 * shape[1] / shape[0]:
            raise HDMInputError(f"{path}: mask is {array.shape[1]}x{array.shape[0]} but its image is "
                                f"{shape[1]}x{shape[0]} (different aspect ratio)")
        array = np.asarray(Image.fromarray(array).resize((shape[1], shape[0]), Image.NEAREST))
    return array > 0 if nonzero else array > 127


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8, bilinear with antialiasing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def sample_mask(sample: "Sample", shape: tuple[int, int], size: int) -> np.ndarray:
    """A sample's ground-truth mask (empty without one) for its image of `shape`, nearest-resized to size x size."""
    mask = (load_mask(sample.mask_path, shape, sample.mask_nonzero) if sample.mask_path
            else np.zeros(shape, bool))
    return resize_mask(mask, size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


def load_images_resized(paths: Iterable[Path], size: int, workers: int = 2) -> np.ndarray:
    """Decode and resize many images into an N x size x size x 3 uint8 array."""
    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(lambda p: resize_image(load_image(p), size), paths))
    return np.stack(images)


@dataclass
class DecodedBatch:
    samples: list[Sample]
    images: np.ndarray  # B x size x size x 3 uint8, zeros where decoding failed
    shapes: list[tuple[int, int]]  # each image's own (H, W)
    errors: list[str | None]
    originals: list[np.ndarray | None]  # decoded images (see `decode_image`), only when asked for


def iter_batches(samples: list[Sample], size: int, batch_size: int, keep_originals: bool = False) -> Iterator[DecodedBatch]:
    """Decode and resize samples batch by batch, one batch ahead of the caller.

    A sample that cannot be read gets a zero image and its error message, so one bad file never
    stops a folder of good ones. Memory is bounded by two batches, whatever the number of samples.
    """

    def decode(sample: Sample) -> tuple[np.ndarray, tuple[int, int], str | None, np.ndarray | None]:
        try:
            image, shape = decode_image(sample.path)
        except HDMInputError as exc:
            return np.zeros((size, size, 3), np.uint8), (size, size), str(exc), None
        return resize_image(image, size), shape, None, image if keep_originals else None

    def decode_batch(chunk: list[Sample]) -> DecodedBatch:
        decoded = [decode(s) for s in chunk]
        return DecodedBatch(chunk, np.stack([d[0] for d in decoded]), [d[1] for d in decoded],
                            [d[2] for d in decoded], [d[3] for d in decoded])

    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode_batch, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            batch = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(decode_batch, chunks[index + 1])
            yield batch
