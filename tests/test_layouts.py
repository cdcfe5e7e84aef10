"""Every layout users have, as small generated trees."""

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import save
from hdm._cli import main
from hdm._data import HDMInputError, load_mask
from hdm._layouts import DataSource, mask_index

RNG = np.random.default_rng(0)


def image():
    return RNG.integers(0, 255, (40, 40, 3), dtype=np.uint8)


def mask(value=255):
    m = np.zeros((40, 40), np.uint8)
    m[5:15, 5:15] = value
    return m


def test_btad_layout_with_ok_folder_and_bmp_masks(tmp_path):
    base = tmp_path / "btad" / "01"
    for i in range(3):
        save(base / "train" / "ok" / f"{i:04d}.bmp", image())
    save(base / "test" / "ok" / "0000.bmp", image())
    save(base / "test" / "ko" / "0000.bmp", image())
    save(base / "ground_truth" / "ko" / "0000.png", mask())
    save(base / "test" / "ko" / "0001.bmp", image())
    save(base / "ground_truth" / "ko" / "0001.bmp", mask())
    source = DataSource.detect(tmp_path / "btad", "01")
    assert source.layout == "mvtec" and len(source.train_samples()) == 3
    test = source.test_samples()
    assert [s.label for s in test] == [1, 1, 0]
    assert [s.mask_path.suffix for s in test[:2]] == [".png", ".bmp"]


def test_visa_one_class_split(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        save(root / "candle" / "Data" / "Images" / "Normal" / f"{i}.JPG", image())
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i}.JPG,")
    save(root / "candle" / "Data" / "Images" / "Normal" / "9.JPG", image())
    rows.append("candle,test,normal,candle/Data/Images/Normal/9.JPG,")
    save(root / "candle" / "Data" / "Images" / "Anomaly" / "0.JPG", image())
    save(root / "candle" / "Data" / "Masks" / "Anomaly" / "0.png", mask(value=1))
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/0.JPG,candle/Data/Masks/Anomaly/0.png")
    rows.append("capsules,train,normal,capsules/x.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    source = DataSource.detect(root, "candle")
    assert source.layout == "visa" and len(source.train_samples()) == 3
    test = source.test_samples()
    assert [s.label for s in test] == [0, 1]
    defect = test[1]
    # VisA masks store 1 for defect: any non-zero value counts
    assert load_mask(defect.mask_path, (40, 40), defect.mask_nonzero).sum() == 100
    with pytest.raises(HDMInputError, match="no 'train' rows for object 'pcb1'"):
        DataSource.detect(root, "pcb1").train_samples()


def generic_tree(root, normal_count):
    """normal/, normal_test/t0.png, bad/a.png with masks/a_mask.png."""
    for i in range(normal_count):
        save(root / "normal" / f"n{i}.png", image())
    save(root / "normal_test" / "t0.png", image())
    save(root / "bad" / "a.png", image())
    save(root / "masks" / "a_mask.png", mask())


def test_generic_folders_match_masks_by_stem(tmp_path):
    generic_tree(tmp_path, 3)
    save(tmp_path / "bad" / "b.jpg", image())
    save(tmp_path / "masks" / "b.png", mask())
    assert set(mask_index(tmp_path / "masks")) == {"a", "b"}
    source = DataSource("folders", normal_dir=tmp_path / "normal", abnormal_dir=tmp_path / "bad",
                        mask_dir=tmp_path / "masks", normal_test_dir=tmp_path / "normal_test")
    assert len(source.train_samples()) == 3
    assert [s.label for s in source.test_samples()] == [0, 1, 1]
    assert DataSource.from_dict(source.to_dict()).test_samples()[1].mask_path.name == "a_mask.png"
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(HDMInputError, match="b.jpg: defect image has no mask"):
        source.test_samples()


def test_cli_generic_folders_end_to_end(tmp_path):
    generic_tree(tmp_path, 4)
    folders = ["--normal-dir", str(tmp_path / "normal"), "--abnormal-dir", str(tmp_path / "bad"),
               "--mask-dir", str(tmp_path / "masks"), "--normal-test-dir", str(tmp_path / "normal_test")]
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", *folders, "--out", str(run), "--steps", "2", "--batch-size", "2",
                                       "--image-size", "64"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["test", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.json").is_file()
    result = CliRunner().invoke(main, ["fit", "--data", str(tmp_path), *folders[:2], "--out", str(tmp_path / "r2")])
    assert result.exit_code != 0 and "either --data or --normal-dir" in result.output
