"""Dataset layouts (MVTec AD, VisA, plain folders), the scan that validates them, and k-shot
sampling.

A scan reads file headers only, so it is fast even on thousands of files, and it never raises on
a flawed dataset: what is wrong is collected as one-line `problems` for the user to read, and the
samples are kept usable. A defect image whose mask is missing, unreadable or of the wrong size
keeps `mask_path=None`: it still counts for image-level metrics and is left out of pixel-level
ones. An image whose header cannot be read is dropped, since it could not be scored.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from astfad.data.images import ImageLoadError, image_size, is_image_file, list_images

LAYOUTS = ("auto", "mvtec", "visa", "folder")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a split: label 0 normal, 1 anomalous; defect_type is "good" for normal."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass
class Category:
    """The scanned train and test samples of one category, with the problems the scan found."""

    name: str
    root: Path
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types of the test split (without "good")."""
        return sorted({s.defect_type for s in self.test if s.label == 1})

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and defect type, e.g. {"train": {"good": 100}, "test": {...}}."""
        return {split: dict(sorted(Counter(s.defect_type for s in samples).items()))
                for split, samples in (("train", self.train), ("test", self.test))}

    def mask_counts(self) -> dict[str, int]:
        """Anomalous test images that have a usable mask, per defect type."""
        counts = Counter(s.defect_type for s in self.test if s.label == 1 and s.mask_path)
        return {t: counts.get(t, 0) for t in self.defect_types}


def _require_dir(root: str | Path) -> Path:
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"dataset root not found: '{path}'")
    if not path.is_dir():
        raise NotADirectoryError(f"dataset root is not a directory: '{path}'")
    return path


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted; other files are ignored silently."""
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=str)


def _select(available: Sequence[str], requested: Sequence[str] | None, where: str) -> list[str]:
    """The requested categories in the given order, or all; an unknown name is an error that
    lists what exists."""
    if requested is None:
        return list(available)
    if isinstance(requested, str):
        requested = [requested]
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(repr(c) for c in unknown)} in {where}; available: "
                         f"{', '.join(available) or 'none'}")
    return list(dict.fromkeys(requested))


def _example(paths: Sequence[Path | str]) -> str:
    """A compact list of names for a problem line: the first three and a count of the rest."""
    names = [Path(p).name for p in paths]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _readable(paths: Iterable[Path], what: str, problems: list[str]) -> list[Path]:
    """The paths whose header reads; the others are reported and dropped."""
    kept, bad = [], []
    for path in paths:
        try:
            image_size(path)
            kept.append(path)
        except ImageLoadError:
            bad.append(path)
    if bad:
        problems.append(f"{what}: {len(bad)} unreadable image(s) skipped: {_example(bad)}")
    return kept


def _check_masks(samples: list[Sample], where: str, problems: list[str]) -> list[Sample]:
    """Anomalous samples with a missing, unreadable or wrong-size mask lose the mask (and are
    reported); everything else passes through unchanged."""
    missing, unreadable, wrong_size, out = [], [], [], []
    for sample in samples:
        if sample.label == 0:
            out.append(sample)
            continue
        mask = sample.mask_path
        if mask is None or not mask.is_file():
            missing.append(sample.path)
            mask = None
        else:
            try:
                image_hw, mask_hw = image_size(sample.path), image_size(mask)
                if image_hw != mask_hw:
                    wrong_size.append(f"{mask.name} {mask_hw[0]}x{mask_hw[1]} vs "
                                      f"{sample.path.name} {image_hw[0]}x{image_hw[1]}")
                    mask = None
            except ImageLoadError:
                unreadable.append(mask)
                mask = None
        out.append(Sample(sample.path, sample.label, sample.defect_type, mask))
    if missing:
        problems.append(f"{where}: {len(missing)} anomalous image(s) without a mask: "
                        f"{_example(missing)}")
    if unreadable:
        problems.append(f"{where}: {len(unreadable)} unreadable mask(s) ignored: "
                        f"{_example(unreadable)}")
    if wrong_size:
        more = f" and {len(wrong_size) - 3} more" if len(wrong_size) > 3 else ""
        problems.append(f"{where}: {len(wrong_size)} mask(s) differ in size (HxW) from their "
                        f"image and are ignored: {', '.join(wrong_size[:3])}{more}")
    return out


def _mask_index(masks: Iterable[Path]) -> dict[str, Path]:
    """Masks by the stem of the image they belong to: `<stem>_mask.<ext>` wins over
    `<stem>.<ext>`, and .png over other extensions."""
    index: dict[str, Path] = {}
    ranked = sorted(masks, key=lambda p: (p.stem.endswith("_mask"), p.suffix.lower() == ".png",
                                          str(p)))
    for mask in ranked:  # later entries are better and overwrite earlier ones
        stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
        index[stem] = mask
    return index


def _mvtec_category(folder: Path) -> Category:
    """Scan one MVTec AD category folder."""
    cat = Category(name=folder.name, root=folder)
    problems = cat.problems
    train_dir, test_dir, gt_dir = folder / "train", folder / "test", folder / "ground_truth"
    good_dir = train_dir / GOOD
    if good_dir.is_dir():
        train = _readable(_images_in(good_dir), "train/good", problems)
        cat.train = [Sample(p, 0, GOOD) for p in train]
        if not cat.train:
            problems.append("train/good has no images")
    else:
        problems.append("no train/good folder")
    for extra in sorted(p.name for p in train_dir.iterdir() if p.is_dir() and p.name != GOOD):
        problems.append(f"train/{extra} ignored: training uses normal images (train/good) only")
    for split_dir in (train_dir, test_dir):
        loose = _images_in(split_dir) if split_dir.is_dir() else []
        if loose:
            problems.append(f"{split_dir.name}/: {len(loose)} image(s) outside a type folder "
                            f"ignored: {_example(loose)}")
    if not test_dir.is_dir():
        problems.append("no test folder")
        return cat
    for type_dir in sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        where = f"test/{type_dir.name}"
        paths = _readable(_images_in(type_dir), where, problems)
        if not paths:
            problems.append(f"{where} has no images")
            continue
        if type_dir.name == GOOD:
            cat.test.extend(Sample(p, 0, GOOD) for p in paths)
            continue
        mask_dir = gt_dir / type_dir.name
        masks = _mask_index(_images_in(mask_dir) if mask_dir.is_dir() else [])
        samples = [Sample(p, 1, type_dir.name, masks.get(p.stem)) for p in paths]
        cat.test.extend(_check_masks(samples, where, problems))
        orphans = sorted(set(masks.values()) - {s.mask_path for s in samples}, key=str)
        if orphans:
            problems.append(f"ground_truth/{type_dir.name}: {len(orphans)} mask(s) match no test "
                            f"image: {_example(orphans)}")
    if not cat.test:
        problems.append("test set is empty")
    return cat


def scan_mvtec(root: str | Path, categories: Sequence[str] | None = None) -> list[Category]:
    """Categories of an MVTec AD tree (`<cat>/train/good`, `<cat>/test/<type>`,
    `<cat>/ground_truth/<type>/<stem>_mask.png` or `<stem>.png`). `root` may also be one category
    folder. Categories are the subfolders holding `train/`; other folders are ignored."""
    root = _require_dir(root)
    if (root / "train").is_dir():
        folders = {root.name: root}
    else:
        folders = {p.name: p for p in sorted(root.iterdir()) if (p / "train").is_dir()}
        if not folders:
            raise ValueError(f"no MVTec AD categories in '{root}': no subfolder contains train/")
    names = _select(list(folders), categories, f"'{root}'")
    return [_mvtec_category(folders[name]) for name in names]


def _resolve_csv(root: Path, split_csv: str | Path | None) -> Path:
    if split_csv is None:
        path = root / "split_csv" / "1cls.csv"
    else:
        path = Path(split_csv)
        if not path.is_absolute() and not path.exists():
            path = root / path
    if not path.is_file():
        raise FileNotFoundError(f"VisA split CSV not found: '{path}'")
    return path


def scan_visa(root: str | Path, categories: Sequence[str] | None = None,
              split_csv: str | Path | None = None) -> list[Category]:
    """Categories of a VisA tree through its split CSV (default `<root>/split_csv/1cls.csv`, columns
    object,split,label,image,mask; paths relative to root). A relative `split_csv` that does not
    exist from the working directory is taken relative to root. Anomalies get defect_type
    "anomaly": the CSV has no finer types."""
    root = _require_dir(root)
    csv_path = _resolve_csv(root, split_csv)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        found = [c.strip() for c in reader.fieldnames or []]
        if not set(VISA_COLUMNS) <= set(found):
            raise ValueError(f"VisA split CSV '{csv_path}' needs columns "
                             f"{', '.join(VISA_COLUMNS)}; found: {', '.join(found) or 'none'}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    available = sorted({row["object"] for row in rows if row["object"]})
    names = _select(available, categories, f"'{csv_path}'")
    result = []
    for name in names:
        cat = Category(name=name, root=root / name)
        bad_rows, missing, test = [], [], []
        for line, row in enumerate(rows, start=2):
            if row["object"] != name:
                continue
            if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
                bad_rows.append(str(line))
                continue
            path = root / row["image"]
            if not path.is_file():
                missing.append(path)
                continue
            label = int(row["label"] == "anomaly")
            mask = root / row["mask"] if label and row["mask"] else None
            sample = Sample(path, label, "anomaly" if label else GOOD, mask)
            if row["split"] == "train" and label:
                bad_rows.append(str(line))
            elif row["split"] == "train":
                cat.train.append(sample)
            else:
                test.append(sample)
        if bad_rows:
            cat.problems.append(f"{csv_path.name}: {len(bad_rows)} row(s) ignored (split must be "
                                f"train/test, label normal/anomaly, train normal only): lines "
                                f"{', '.join(bad_rows[:5])}{' ...' if len(bad_rows) > 5 else ''}")
        if missing:
            cat.problems.append(f"{len(missing)} image(s) listed in {csv_path.name} not found: "
                                f"{_example(missing)}")
        cat.train = [Sample(p, 0, GOOD) for p in
                     _readable(sorted((s.path for s in cat.train), key=str), "train", cat.problems)]
        readable = set(_readable([s.path for s in test], "test", cat.problems))
        test = sorted((s for s in test if s.path in readable), key=lambda s: (s.label, str(s.path)))
        cat.test = _check_masks(test, "test", cat.problems)
        if not cat.train:
            cat.problems.append("no training images")
        if not cat.test:
            cat.problems.append("test set is empty")
        result.append(cat)
    return result


def scan_folder(normal_dir: str | Path, abnormal_dir: str | Path | None = None,
                mask_dir: str | Path | None = None, normal_test_dir: str | Path | None = None,
                name: str | None = None, train_fraction: float = 0.8) -> Category:
    """One category from plain folders (anomalib's Folder convention): normal images train;
    abnormal images are test samples (defect_type "abnormal") with masks matched by stem
    (`<stem>.png` or `<stem>_mask.png`) in `mask_dir`.

    Without `normal_test_dir`, and only when abnormal images exist (otherwise there is no test set
    to hold them), a deterministic `1 - train_fraction` share of the normal images (at least one,
    chosen by a fixed-seed shuffle so it does not follow file-name order) moves to the test set.
    Any folder argument may also be a glob or list accepted by `list_images`."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1], got {train_fraction}")
    if mask_dir is not None and abnormal_dir is None:
        raise ValueError("mask_dir was given without abnormal_dir: masks belong to abnormal images")
    normal = list_images(normal_dir)
    root = normal[0].parent.parent
    cat = Category(name=name or root.name, root=root)
    problems = cat.problems
    normal = _readable(normal, "normal", problems)
    abnormal = _readable(list_images(abnormal_dir), "abnormal", problems) if abnormal_dir else []
    test_normal: list[Path] = []
    if normal_test_dir is not None:
        test_normal = _readable(list_images(normal_test_dir), "normal test", problems)
    elif abnormal and train_fraction < 1.0:
        if len(normal) == 1:
            problems.append("only one normal image: none held out for the test set")
        elif normal:
            n_test = min(len(normal) - 1, max(1, round(len(normal) * (1.0 - train_fraction))))
            shuffled = list(normal)
            random.Random(0).shuffle(shuffled)
            test_normal = sorted(shuffled[:n_test], key=str)
            normal = sorted(shuffled[n_test:], key=str)
    masks = _mask_index(list_images(mask_dir)) if mask_dir is not None else {}
    cat.train = [Sample(p, 0, GOOD) for p in normal]
    test = [Sample(p, 0, GOOD) for p in test_normal]
    test += [Sample(p, 1, "abnormal", masks.get(p.stem)) for p in abnormal]
    cat.test = test if mask_dir is None else _check_masks(test, "abnormal", problems)
    if not cat.train:
        problems.append("no training images")
    return cat


def _folder_layout(root: Path, categories: Sequence[str] | None) -> list[Category]:
    """scan_folder on a root holding `good/` or `normal/`, optional `abnormal/` (or `anomaly/`)
    and `mask/` (or `masks/`, `ground_truth/`)."""
    def first(*names: str) -> Path | None:
        return next((root / n for n in names if (root / n).is_dir()), None)

    normal = first("good", "normal")
    if normal is None:
        raise ValueError(f"'{root}' is not a folder layout: no good/ or normal/ subfolder")
    abnormal = first("abnormal", "anomaly")
    masks = first("mask", "masks", "ground_truth") if abnormal else None
    cat = scan_folder(normal, abnormal, masks, name=root.name)
    _select([cat.name], categories, f"'{root}'")
    return [cat]


def detect_layout(root: str | Path) -> str:
    """The layout of a dataset root: "visa" when `split_csv/1cls.csv` exists, "mvtec" when the
    root or a subfolder holds `train/`, "folder" when it holds `good/` or `normal/`."""
    root = _require_dir(root)
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if (root / "train").is_dir() or any((p / "train").is_dir() for p in root.iterdir()):
        return "mvtec"
    if (root / "good").is_dir() or (root / "normal").is_dir():
        return "folder"
    raise ValueError(f"cannot tell the layout of '{root}': tried visa (split_csv/1cls.csv), mvtec "
                     "(<category>/train/ or train/) and folder (good/ or normal/); none matched")


def scan_dataset(root: str | Path, layout: str = "auto",
                 categories: Sequence[str] | None = None) -> list[Category]:
    """Scan a dataset in one of `LAYOUTS`; "auto" detects it (see `detect_layout`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = _require_dir(root)
    if layout == "auto":
        try:
            layout = detect_layout(root)
        except ValueError:
            found = _scan_collection(root, categories)
            if found is None:
                raise
            return found
    if layout == "visa":
        return scan_visa(root, categories)
    if layout == "mvtec":
        return scan_mvtec(root, categories)
    return _folder_layout(root, categories)


def _scan_collection(root: Path, categories: Sequence[str] | None) -> list[Category] | None:
    """A folder of dataset roots (e.g. `data/bsdata`, `data/magnetic_tile`): every subfolder with a
    detectable layout, scanned in turn; None when no subfolder is a dataset."""
    found: list[Category] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found += scan_dataset(sub, "auto")
        except ValueError:
            continue
    if not found:
        return None
    names = [c.name for c in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"'{root}' holds several datasets with categories named {', '.join(duplicates)}; "
                         "point at one dataset root")
    chosen = _select(names, categories, f"'{root}'")
    return [c for c in found if c.name in chosen]


def format_scan(categories: Sequence[Category]) -> str:
    """A table of a scan: train and test counts, anomalous images per defect type as
    `type images/with mask`, then every problem, one per line."""
    header = ("category", "train good", "test good", "test defects (images/with mask)")
    rows = []
    for cat in categories:
        counts, masks = cat.counts(), cat.mask_counts()
        defects = ", ".join(f"{t} {counts['test'][t]}/{masks[t]}" for t in cat.defect_types)
        rows.append((cat.name, str(counts["train"].get(GOOD, 0)),
                     str(counts["test"].get(GOOD, 0)), defects or "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]

    def line(row: Sequence[str]) -> str:
        return (f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  "
                f"{row[3]}").rstrip()

    out = [line(header), line(["-" * w for w in widths] + ["-" * len(header[3])])]
    out += [line(r) for r in rows]
    problems = [f"  {cat.name}: {p}" for cat in categories for p in cat.problems]
    out.append("problems:" if problems else "problems: none")
    out += problems
    return "\n".join(out)


T = TypeVar("T", Sample, Path, str)


def _sort_key(item: Sample | Path | str) -> str:
    return str(item.path if isinstance(item, Sample) else item)


def sample_shots(samples: Sequence[T], k: int, seed: int, mode: str = "random") -> list[T]:
    """k training shots, explicit and seeded, from the samples sorted by path.

    "random": `random.Random(seed).sample` of the sorted list. "slice": the disjoint slice
    `sorted[seed*k:(seed+1)*k]` (the AnomalyDINO protocol), so seeds 0, 1, ... never share a shot;
    a slice that would run past the end is an error, not a wrap-around."""
    if mode not in ("random", "slice"):
        raise ValueError(f"unknown shot sampling mode {mode!r}; choose 'random' or 'slice'")
    if k <= 0:
        raise ValueError(f"k must be at least 1, got {k}")
    n = len(samples)
    if k > n:
        raise ValueError(f"cannot draw k={k} shots from n={n} samples")
    ordered = sorted(samples, key=_sort_key)
    if mode == "random":
        return random.Random(seed).sample(ordered, k)
    if seed < 0:
        raise ValueError(f"slice sampling needs seed >= 0, got {seed}")
    if seed * k + k > n:
        raise ValueError(f"slice sampling: seed*k+k = {seed}*{k}+{k} = {seed * k + k} exceeds "
                         f"n={n} samples; use seeds 0..{n // k - 1} for k={k}")
    return ordered[seed * k:(seed + 1) * k]

