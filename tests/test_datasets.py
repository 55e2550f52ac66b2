"""Dataset scans (MVTec AD, VisA, folder, auto) with their problem reports, and k-shot sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from astfad.data.datasets import (Category, Sample, detect_layout, format_scan, sample_shots,
                                  scan_dataset, scan_folder, scan_mvtec, scan_visa)



def _png(path: Path, h: int = 8, w: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, dtype=np.uint8)).save(path)
    return path


def _mvtec_tree(root: Path) -> Path:
    """bottle: every kind of flaw; cable: clean, no test/good; empty: nothing in it."""
    bottle = root / "bottle"
    for i in range(5):
        _png(bottle / "train" / "good" / f"{i:03d}.png")
    (bottle / "train" / "good" / "notes.txt").write_text("ignored")
    for i in range(2):
        _png(bottle / "test" / "good" / f"{i:03d}.png")
    for i in range(3):
        _png(bottle / "test" / "crack" / f"{i:03d}.png")
    _png(bottle / "ground_truth" / "crack" / "000_mask.png")
    _png(bottle / "ground_truth" / "crack" / "001.png")  # MVTec-like data named <stem>.png
    _png(bottle / "ground_truth" / "crack" / "099_mask.png")  # belongs to no image
    _png(bottle / "test" / "dent" / "000.png")
    _png(bottle / "ground_truth" / "dent" / "000_mask.png", h=9)
    cable = root / "cable"
    for i in range(3):
        _png(cable / "train" / "good" / f"{i:03d}.jpg")
    _png(cable / "test" / "cut" / "000.jpg")
    _png(cable / "ground_truth" / "cut" / "000_mask.png")
    (root / "empty" / "train" / "good").mkdir(parents=True)
    (root / "docs").mkdir()  # no train/: not a category
    return root


def test_scan_mvtec_counts_and_problems(tmp_path: Path) -> None:
    cats = {c.name: c for c in scan_mvtec(_mvtec_tree(tmp_path))}
    assert list(cats) == ["bottle", "cable", "empty"]
    bottle = cats["bottle"]
    assert bottle.counts() == {"train": {"good": 5}, "test": {"crack": 3, "dent": 1, "good": 2}}
    assert bottle.defect_types == ["crack", "dent"]
    assert bottle.mask_counts() == {"crack": 2, "dent": 0}
    masks = {s.path.name: s.mask_path for s in bottle.test if s.defect_type == "crack"}
    assert masks["000.png"].name == "000_mask.png" and masks["001.png"].name == "001.png"
    assert masks["002.png"] is None
    assert all(s.label == 1 for s in bottle.test if s.defect_type != "good")
    assert [s.path.name for s in bottle.train] == ["000.png", "001.png", "002.png", "003.png",
                                                   "004.png"]
    problems = "\n".join(bottle.problems)
    assert "test/crack: 1 anomalous image(s) without a mask: 002.png" in problems
    assert "test/dent: 1 mask(s) differ in size" in problems and "9x8 vs 000.png 8x8" in problems
    assert "ground_truth/crack: 1 mask(s) match no test image: 099_mask.png" in problems
    assert len(bottle.problems) == 3  # the .txt file is ignored silently
    cable = cats["cable"]
    assert cable.counts() == {"train": {"good": 3}, "test": {"cut": 1}}
    assert cable.problems == []
    assert set(cats["empty"].problems) == {"train/good has no images", "no test folder"}


def test_format_scan_table(tmp_path: Path) -> None:
    text = format_scan(scan_mvtec(_mvtec_tree(tmp_path)))
    lines = text.splitlines()
    assert lines[0].split() == ["category", "train", "good", "test", "good", "test", "defects",
                                "(images/with", "mask)"]
    assert lines[2].split() == ["bottle", "5", "2", "crack", "3/2,", "dent", "1/0"]
    assert lines[3].split() == ["cable", "3", "0", "cut", "1/1"]
    assert "problems:" in lines and "  empty: no test folder" in lines


def test_scan_mvtec_single_category_and_selection(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    (single,) = scan_mvtec(root / "cable")
    assert single.name == "cable" and single.counts()["train"] == {"good": 3}
    assert [c.name for c in scan_mvtec(root, ["cable", "bottle"])] == ["cable", "bottle"]
    with pytest.raises(ValueError, match=r"'wood'.*available: bottle, cable, empty"):
        scan_mvtec(root, ["wood"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_mvtec(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no subfolder contains train/"):
        scan_mvtec(root / "docs")


def test_scan_mvtec_drops_unreadable_images(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    (root / "cable" / "train" / "good" / "zz_broken.png").write_bytes(b"garbage")
    (cable,) = scan_mvtec(root, ["cable"])
    assert cable.counts()["train"] == {"good": 3}
    assert cable.problems == ["train/good: 1 unreadable image(s) skipped: zz_broken.png"]


def _visa_tree(root: Path, header: str = "object,split,label,image,mask") -> Path:
    rows = [header]
    for i in range(3):
        _png(root / "candle" / "Data" / "Images" / "Normal" / f"{i:04d}.JPG")
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    _png(root / "candle" / "Data" / "Images" / "Normal" / "0100.JPG")
    rows.append("candle,test,normal,candle/Data/Images/Normal/0100.JPG,")
    for i in range(2):
        _png(root / "candle" / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG")
        _png(root / "candle" / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png")
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,"
                    f"candle/Data/Masks/Anomaly/{i:03d}.png")
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/gone.JPG,candle/x.png")
    _png(root / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_scan_visa(tmp_path: Path) -> None:
    cats = {c.name: c for c in scan_visa(_visa_tree(tmp_path))}
    assert list(cats) == ["candle", "pcb1"]
    candle = cats["candle"]
    assert candle.counts() == {"train": {"good": 3}, "test": {"anomaly": 2, "good": 1}}
    assert candle.mask_counts() == {"anomaly": 2}
    assert candle.problems == ["1 image(s) listed in 1cls.csv not found: gone.JPG"]
    assert set(cats["pcb1"].problems) == {"test set is empty"}
    (only,) = scan_visa(tmp_path, ["pcb1"])
    assert only.name == "pcb1"


def test_scan_visa_wrong_columns(tmp_path: Path) -> None:
    _visa_tree(tmp_path, header="object,split,label,path")
    with pytest.raises(ValueError, match=r"1cls\.csv.*found: object, split, label, path"):
        scan_visa(tmp_path)


def test_scan_folder(tmp_path: Path) -> None:
    for i in range(10):
        _png(tmp_path / "parts" / "normal" / f"n{i}.png")
    for i in range(3):
        _png(tmp_path / "parts" / "bad" / f"a{i}.png")
    _png(tmp_path / "parts" / "masks" / "a0.png")
    _png(tmp_path / "parts" / "masks" / "a1_mask.png")
    cat = scan_folder(tmp_path / "parts" / "normal", tmp_path / "parts" / "bad",
                      tmp_path / "parts" / "masks")
    assert cat.name == "parts"
    assert cat.counts() == {"train": {"good": 8}, "test": {"abnormal": 3, "good": 2}}
    train, held_out = {s.path for s in cat.train}, {s.path for s in cat.test if s.label == 0}
    assert not train & held_out and len(train | held_out) == 10
    again = scan_folder(tmp_path / "parts" / "normal", tmp_path / "parts" / "bad",
                        tmp_path / "parts" / "masks")
    assert again == cat  # deterministic hold-out
    masks = {s.path.name: s.mask_path and s.mask_path.name for s in cat.test if s.label}
    assert masks == {"a0.png": "a0.png", "a1.png": "a1_mask.png", "a2.png": None}
    assert cat.problems == ["abnormal: 1 anomalous image(s) without a mask: a2.png"]
    normal_only = scan_folder(tmp_path / "parts" / "normal", name="x")
    assert normal_only.name == "x" and len(normal_only.train) == 10 and not normal_only.test
    _png(tmp_path / "parts" / "normal_test" / "t0.png")
    separate = scan_folder(tmp_path / "parts" / "normal", tmp_path / "parts" / "bad",
                           normal_test_dir=tmp_path / "parts" / "normal_test")
    assert separate.counts()["train"] == {"good": 10}
    assert separate.counts()["test"] == {"abnormal": 3, "good": 1}
    with pytest.raises(ValueError, match="train_fraction"):
        scan_folder(tmp_path / "parts" / "normal", train_fraction=0.0)


def test_scan_dataset_auto(tmp_path: Path) -> None:
    mvtec, visa, folder = tmp_path / "mvtec", tmp_path / "visa", tmp_path / "folder"
    _mvtec_tree(mvtec)
    _visa_tree(visa)
    for i in range(4):
        _png(folder / "good" / f"{i}.png")
    _png(folder / "abnormal" / "x.png")
    _png(folder / "mask" / "x_mask.png")
    assert [detect_layout(p) for p in (mvtec, visa, folder, mvtec / "cable")] == \
        ["mvtec", "visa", "folder", "mvtec"]
    assert [c.name for c in scan_dataset(mvtec)] == ["bottle", "cable", "empty"]
    assert [c.name for c in scan_dataset(visa, categories=["candle"])] == ["candle"]
    (cat,) = scan_dataset(folder)
    assert cat.name == "folder" and cat.mask_counts() == {"abnormal": 1}
    assert [c.name for c in scan_dataset(mvtec, layout="mvtec", categories=["cable"])] == ["cable"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"tried visa.*mvtec.*folder"):
        scan_dataset(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown layout"):
        scan_dataset(mvtec, layout="kitti")


def test_scan_dataset_collection_of_roots(tmp_path: Path) -> None:
    """A folder of dataset roots (as ../shared/data) scans every dataset in it."""
    _mvtec_tree(tmp_path / "set_a")
    for i in range(3):
        _png(tmp_path / "set_b" / "screw" / "train" / "good" / f"{i}.png")
    (tmp_path / "notes").mkdir()
    names = [c.name for c in scan_dataset(tmp_path)]
    assert names == ["bottle", "cable", "empty", "screw"]
    assert [c.name for c in scan_dataset(tmp_path, categories=["screw"])] == ["screw"]
    _png(tmp_path / "set_c" / "cable" / "train" / "good" / "0.png")
    with pytest.raises(ValueError, match="several datasets with categories named cable"):
        scan_dataset(tmp_path)


def _paths(n: int) -> list[Path]:
    return [Path(f"/data/{i:03d}.png") for i in reversed(range(n))]


def test_sample_shots_random() -> None:
    paths = _paths(20)
    shots = sample_shots(paths, 5, seed=3)
    assert shots == sample_shots(list(reversed(paths)), 5, seed=3)  # input order does not matter
    assert len(set(shots)) == 5 and set(shots) <= set(paths)
    assert shots != sample_shots(paths, 5, seed=4)
    samples = [Sample(p, 0, "good") for p in paths]
    picked = sample_shots(samples, 5, seed=3)
    assert all(isinstance(s, Sample) for s in picked) and [s.path for s in picked] == shots


def test_sample_shots_slice() -> None:
    paths = _paths(10)
    ordered = sorted(paths, key=str)
    slices = [sample_shots(paths, 3, seed=s, mode="slice") for s in range(3)]
    assert slices[0] == ordered[0:3] and slices[2] == ordered[6:9]
    assert len(set().union(*map(set, slices))) == 9  # disjoint across seeds
    with pytest.raises(ValueError, match=r"seed\*k\+k = 3\*3\+3 = 12 exceeds n=10"):
        sample_shots(paths, 3, seed=3, mode="slice")


def test_sample_shots_errors() -> None:
    with pytest.raises(ValueError, match=r"k=11.*n=10"):
        sample_shots(_paths(10), 11, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        sample_shots(_paths(10), 0, seed=0)
    with pytest.raises(ValueError, match="unknown shot sampling mode"):
        sample_shots(_paths(10), 1, seed=0, mode="first")


@pytest.mark.shared_data
def test_real_datasets_in_shared_data() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    expected = {
        "bsdata": ("ball_screw_drive", 100, 60, {"pitting": 100}),
        "magnetic_tile": ("magnetic_tile", 200, 100, {"blowhole": 115, "break": 85, "crack": 57,
                                                      "fray": 32, "uneven": 99}),
        "hazelnut_toy": ("hazelnut", 28, 6, {"colour": 17}),
    }
    for folder, (name, train, test_good, defects) in expected.items():
        (cat,) = scan_dataset(SHARED_DATA / folder)
        assert isinstance(cat, Category) and cat.name == name
        counts = cat.counts()
        assert counts["train"] == {"good": train}
        assert counts["test"] == {"good": test_good, **defects}
        assert cat.mask_counts() == defects  # every defect image has a usable mask
        assert cat.problems == []
