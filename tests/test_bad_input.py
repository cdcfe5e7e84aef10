"""The bad-input corpus: each broken or unusual file, made here, gets its documented behaviour."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save
from hdm._data import HDMInputError, decode_image, list_images, load_image, load_mask
from hdm._store import load_checkpoint, save_checkpoint, write_bytes_atomic
from hdm._config import HDMConfig

RNG = np.random.default_rng(0)


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


PHOTO = RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8)

REFUSED = {
    "zero_byte.png": (b"", "empty file"),
    "truncated.png": (encoded(PHOTO, "PNG")[:200], "not a readable image"),
    "truncated.jpg": (encoded(PHOTO, "JPEG")[:300], "not a readable image"),
    "text.png": (b"this is a note, not a picture\n", "not a readable image"),
    "tiny.png": (encoded(np.zeros((1, 1, 3), np.uint8), "PNG"), "too small"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_broken_images_are_refused_in_one_line_naming_the_file(tmp_path, name):
    payload, problem = REFUSED[name]
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(HDMInputError) as error:
        load_image(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(PHOTO).convert("CMYK").save(path, format="JPEG", quality=95)
    array = load_image(path)
    assert array.shape == (40, 60, 3) and np.abs(array.astype(int) - PHOTO).mean() < 12


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    gray = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(gray).save(path)
    array = load_image(path)
    assert array.shape == (40, 60, 3) and array.min() == 0 and array.max() == 255


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((30, 30, 3), value, np.uint8)) for value in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    array = load_image(path)
    assert array.shape == (30, 30, 3) and abs(int(array.mean()) - 10) <= 2


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was rotated: display 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image).save(path, exif=exif, quality=95)
    array, shape = decode_image(path)
    assert array.shape == (40, 20, 3) and shape == (40, 20)
    assert array[:20].mean() > 200 and array[20:].mean() < 50  # the white half is now on top


def test_very_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "huge.jpg"
    gradient = np.linspace(0, 255, 6000, dtype=np.float32).astype(np.uint8)
    Image.fromarray(np.broadcast_to(gradient, (4000, 6000))).convert("RGB").save(path, quality=80)
    array, shape = decode_image(path)
    assert shape == (4000, 6000)  # maps are still made at the image's own size
    assert max(array.shape[:2]) < 6000 and max(array.shape[:2]) >= 2048  # the decoder never made the full bitmap


def test_masks_with_other_values_are_binarised(tmp_path):
    mask = np.array([[0, 1, 127, 128], [200, 255, 3, 0]], np.uint8)
    path = save(tmp_path / "m.png", np.repeat(np.repeat(mask, 4, 0), 4, 1))
    half = load_mask(path, (8, 16))
    assert half[0, 12] and half[4, 0] and not half[0, 4] and not half[0, 8]
    nonzero = load_mask(path, (8, 16), nonzero=True)
    assert nonzero[0, 4] and nonzero[4, 8] and not nonzero[0, 0]


def test_mask_of_another_shape_is_refused_and_a_rescaled_one_accepted(tmp_path):
    path = save(tmp_path / "wrong_mask.png", np.zeros((50, 50), np.uint8))
    with pytest.raises(HDMInputError, match=r"wrong_mask.png: mask is 50x50 but its image is 60x40"):
        load_mask(path, (40, 60))
    half = save(tmp_path / "half_mask.png", np.full((20, 30), 255, np.uint8))
    assert load_mask(half, (40, 60)).all()


def test_symlink_loop_in_the_data_folder_ends(tmp_path):
    folder = tmp_path / "normal"
    save(folder / "a.png", PHOTO)
    os.symlink(folder, folder / "loop")
    assert list_images(folder) == [folder / "a.png"]


def test_foreign_and_incompatible_checkpoints_are_refused(tmp_path):
    config = HDMConfig()
    path = tmp_path / "model.pt"
    save_checkpoint(path, config, {"w": torch.zeros(2)})
    assert load_checkpoint(path)[1]["w"].shape == (2,)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    with pytest.raises(HDMInputError, match="format version 1 is not supported"):
        load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(HDMInputError, match="other.pt: not an hdm checkpoint"):
        load_checkpoint(other)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(HDMInputError, match="notes.pt: not a loadable hdm checkpoint"):
        load_checkpoint(text)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_with_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "hdm-checkpoint", "version": 2, "config": {}, "state": Evil()}, path)
    with pytest.raises(HDMInputError, match="evil.pt: not a loadable hdm checkpoint"):
        load_checkpoint(path)
