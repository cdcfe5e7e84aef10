import numpy as np
import pytest
from PIL import Image

from conftest import save
from hdm._data import HDMInputError, list_images, load_image, load_mask
from hdm._layouts import DataSource, mvtec_samples


def test_every_mode_becomes_three_channel_uint8(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(gray),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)),
        "palette.png": Image.fromarray(gray).convert("P"),
        "deep.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "photo.jpg": Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)),
        "scan.bmp": Image.fromarray(gray),
        "scan.tif": Image.fromarray(gray),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        array = load_image(tmp_path / name)
        assert array.shape == (20, 30, 3) and array.dtype == np.uint8, name
    # 16-bit data keeps its dynamic range when brought to 8 bits
    deep = load_image(tmp_path / "deep.png")[..., 0].astype(int)
    assert np.abs(deep - gray).max() <= 1


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text")
    with pytest.raises(HDMInputError, match="notes.png: not a readable image"):
        load_image(bad)
    with pytest.raises(HDMInputError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")


def test_masks_are_binarised_and_resized(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[:5] = 200
    mask[5:, :2] = 100
    save(tmp_path / "m.png", mask)
    loaded = load_mask(tmp_path / "m.png", (20, 20))
    assert loaded.dtype == bool and loaded.shape == (20, 20)
    assert loaded[:10].all() and not loaded[10:].any()


def test_mvtec_layout(tiny_mvtec):
    train = DataSource.detect(tiny_mvtec, "cat").train_samples()
    assert len(train) == 3 and all(s.label == 0 for s in train)
    test = mvtec_samples(tiny_mvtec, "cat", "test")
    assert [s.label for s in test] == [1, 1, 0]
    assert test[0].mask_path.name == "000_mask.png" and test[0].defect_type == "crack"


def test_defect_without_mask_is_refused(tiny_mvtec):
    (tiny_mvtec / "cat" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(HDMInputError, match="001.png: defect image has no mask"):
        mvtec_samples(tiny_mvtec, "cat", "test")


def test_plain_folder_and_empty_folder(tmp_path):
    save(tmp_path / "imgs" / "a.jpg", np.zeros((16, 16, 3), np.uint8))
    save(tmp_path / "imgs" / "sub" / "b.PNG", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "imgs" / "readme.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path / "imgs")] == ["a.jpg", "b.PNG"]
    assert len(DataSource.detect(tmp_path / "imgs", None).train_samples()) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(HDMInputError, match="empty: no normal training images"):
        DataSource.detect(tmp_path / "empty", None).train_samples()


def test_the_network_is_blocked_inside_tests():
    import socket
    import urllib.request

    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)
