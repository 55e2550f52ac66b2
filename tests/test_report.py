"""results.csv round trip, the summary's numbers (recomputed here by hand) and the plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from PIL import Image

from astfad.report import (RESULT_COLUMNS, VERDICT_COLUMNS, append_failure, append_row, check_appendable,
                           read_failures, order_strategies, plot_results, read_results,
                           summarise, write_summary)


def make_row(category: str = "bottle", shots: int = 1, seed: int = 0, strategy: str = "texture",
             applied: str | None = None, image_auroc: float = 0.9, pixel_auroc: float = 0.8,
             **extra) -> dict:
    row = dict(category=category, shots=shots, seed=seed, strategy=strategy,
               applied_strategy=applied or strategy, image_auroc=image_auroc, pixel_auroc=pixel_auroc,
               aupro=0.7, image_f1_max=0.6, pixel_f1_max=0.5, image_ap=0.85, pixel_ap=0.4,
               fit_seconds=2.0, predict_seconds_per_image=0.05, shot_files="a.png;b.png",
               **dict.fromkeys(VERDICT_COLUMNS, math.nan))
    row.update(extra)
    return row


def section(text: str, *headings: str) -> str:
    """The text under the nested headings, up to the next heading of the same or a higher level."""
    for heading in headings:
        level = heading.split(" ")[0]
        start = text.index(heading + "\n")
        rest = text[start + len(heading) + 1:]
        ends = [i for i in range(len(rest)) if rest.startswith("\n#", i)
                and len(rest[i + 1:].split(" ")[0]) <= len(level)]
        text = rest[: ends[0]] if ends else rest
    return text


def table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row '{first_cell}' in:\n{text}")


def pct(values, ddof_std: bool = True) -> str:
    mean = 100 * np.mean(values)
    return f"{mean:.1f} ± {100 * np.std(values, ddof=1):.1f}" if ddof_std else f"{mean:.1f}"


def test_rows_round_trip_with_nan(tmp_path):
    path = tmp_path / "out" / "results.csv"
    rows = [make_row(seed=0, image_auroc=0.123456789, pixel_auroc=math.nan),
            make_row(seed=1, strategy="fusion_weighted_sum:0.25", pixel_auroc=None,
                     image_auroc=np.float32(0.5), shot_files=["x,1.png", "y.png"], fit_seconds=1234567.8)]
    for row in rows:
        append_row(path, row)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(RESULT_COLUMNS) and len(lines) == 3
    assert ",nan," in lines[1]

    back = read_results(path)
    assert [r["seed"] for r in back] == [0, 1] and isinstance(back[0]["shots"], int)
    assert back[0]["image_auroc"] == pytest.approx(0.123457, abs=0) and math.isnan(back[0]["pixel_auroc"])
    assert math.isnan(back[1]["pixel_auroc"]) and back[1]["image_auroc"] == 0.5
    assert back[1]["fit_seconds"] == 1234570.0  # 6 significant digits
    assert back[1]["strategy"] == "fusion_weighted_sum:0.25"
    assert back[1]["shot_files"] == "x,1.png;y.png"
    assert set(back[0]) == set(RESULT_COLUMNS)


def test_empty_field_reads_as_nan(tmp_path):
    path = tmp_path / "results.csv"
    append_row(path, make_row())
    path.write_text(path.read_text().replace(",0.8,", ",,"))
    assert math.isnan(read_results(path)[0]["pixel_auroc"])


def test_header_mismatch_is_refused(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("category,shots,seed,strategy,image_auroc\nbottle,1,0,texture,0.9\n")
    with pytest.raises(ValueError, match=r"results\.csv.*columns differ"):
        read_results(path)
    with pytest.raises(ValueError, match="columns differ"):
        append_row(path, make_row())
    assert path.read_text().count("\n") == 2  # untouched


def test_row_with_wrong_keys_is_refused(tmp_path):
    row = make_row()
    del row["aupro"]
    with pytest.raises(ValueError, match="aupro"):
        append_row(tmp_path / "results.csv", row)
    assert not (tmp_path / "results.csv").exists()


def test_interrupted_last_line_is_dropped(tmp_path):
    path = tmp_path / "results.csv"
    append_row(path, make_row(seed=0))
    with open(path, "a") as f:
        f.write("bottle,1,1,tex")  # a write cut by a crash
    with pytest.warns(RuntimeWarning, match="unfinished"):
        assert [r["seed"] for r in read_results(path)] == [0]
    append_row(path, make_row(seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["seed"] for r in read_results(path)] == [0, 2]


def test_strategy_order():
    names = ["oracle", "preset:b", "auto", "fusion_weighted_sum:0.75", "fusion_max", "semantic",
             "fusion_weighted_sum:0.25", "texture", "preset:a", "semantic_adapter", "fusion_add", "auto"]
    assert order_strategies(names) == [
        "texture", "semantic", "semantic_adapter", "fusion_add", "fusion_max",
        "fusion_weighted_sum:0.25", "fusion_weighted_sum:0.75", "auto", "preset:a", "preset:b", "oracle"]
    pairs = ["fusion_weighted_sum:0.3:semantic+subspace", "auto", "fusion_mul:semantic+subspace", "subspace",
             "fusion_weighted_sum:0.7", "fusion_add:semantic+subspace", "fusion_mul"]
    assert order_strategies(pairs) == [  # the default pair's fusions first, each pair's rules in order
        "subspace", "fusion_mul", "fusion_weighted_sum:0.7", "fusion_add:semantic+subspace",
        "fusion_mul:semantic+subspace", "fusion_weighted_sum:0.3:semantic+subspace", "auto"]


@pytest.fixture
def hand_rows() -> list[dict]:
    """2 categories x 3 seeds at 1 and 4 shots; texture, auto (picks texture twice, fusion_add once)
    and an oracle that is best but must not be bold; pixel AUROC undefined for 'cable'."""
    values = {  # (strategy, category) -> image AUROC per seed
        ("texture", "bottle"): [0.90, 0.92, 0.94], ("texture", "cable"): [0.70, 0.80, 0.75],
        ("auto", "bottle"): [0.95, 0.93, 0.97], ("auto", "cable"): [0.72, 0.78, 0.74],
        ("oracle", "bottle"): [0.99, 0.99, 0.99], ("oracle", "cable"): [0.99, 0.98, 0.99],
    }
    rows = []
    for shots in (1, 4):
        for (strategy, category), per_seed in values.items():
            for seed, v in enumerate(per_seed):
                applied = ("fusion_add" if seed == 1 else "texture") if strategy == "auto" else None
                rows.append(make_row(category, shots, seed, strategy, applied, image_auroc=v + shots / 1000,
                                     pixel_auroc=math.nan if category == "cable" else v - 0.1,
                                     fit_seconds=1.0 + seed, predict_seconds_per_image=0.02))
    return rows


def test_summary_numbers_bold_and_paper_table(tmp_path, hand_rows):
    path = write_summary(hand_rows, tmp_path / "report")
    assert path == tmp_path / "report" / "summary.md"
    text = path.read_text()
    assert "3 seeds (0, 1, 2)" in text and "shot counts 1, 4" in text

    raw_tex = {"bottle": np.array([0.90, 0.92, 0.94]), "cable": np.array([0.70, 0.80, 0.75])}
    raw_auto = {"bottle": np.array([0.95, 0.93, 0.97]), "cable": np.array([0.72, 0.78, 0.74])}
    tex = {c: v + 0.001 for c, v in raw_tex.items()}  # image AUROC at 1 shot
    auto = {c: v + 0.001 for c, v in raw_auto.items()}
    one_shot = section(text, "## Image AUROC", "### 1-shot")
    texture_row = table_row(one_shot, "texture")
    auto_row = table_row(one_shot, "auto")
    # per category: mean ± std over seeds; mean column: per-seed mean over categories, then over seeds
    assert texture_row[1:] == [pct(tex["bottle"]), f"**{pct(tex['cable'])}**",  # texture best on cable
                               pct((tex["bottle"] + tex["cable"]) / 2)]
    assert auto_row[1:] == [f"**{pct(auto['bottle'])}**", pct(auto["cable"]),  # auto best on bottle
                            f"**{pct((auto['bottle'] + auto['cable']) / 2)}**"]
    assert "**" not in "".join(table_row(one_shot, "oracle"))  # upper bound, never bold
    overview = section(text, "## Image AUROC", "### All categories")
    assert table_row(overview, "auto")[1] == auto_row[3]

    pixel = section(text, "## Pixel AUROC", "### 1-shot")
    assert table_row(pixel, "texture")[1:] == [pct(raw_tex["bottle"] - 0.1), "–", pct(raw_tex["bottle"] - 0.1)]

    paper = section(text, "## astfad (`auto`) vs baseline `texture` (PatchCore)", "### 4-shot")
    assert paper.count("| Category | Applied Strategy | Image AUROC (astfad) | Baseline Image AUROC |") == 1
    bottle = table_row(paper, "bottle")
    assert bottle[1] == "texture (2/3), fusion_add (1/3)"
    assert bottle[2:] == [f"{100 * (np.mean(raw_auto['bottle']) + 0.004):.1f}",
                          f"{100 * (np.mean(raw_tex['bottle']) + 0.004):.1f}",
                          f"{100 * (np.mean(raw_auto['bottle']) - 0.1):.1f}",
                          f"{100 * (np.mean(raw_tex['bottle']) - 0.1):.1f}"]
    assert table_row(paper, "cable")[4:] == ["–", "–"]
    mean = table_row(paper, "**Mean**")
    assert mean[1] == "texture (4/6), fusion_add (2/6)"
    assert mean[2] == f"{100 * (np.mean((raw_auto['bottle'] + raw_auto['cable']) / 2) + 0.004):.1f}"

    timing = table_row(section(text, "## Timing"), "texture")
    assert timing[1:] == ["2.00", "2.00", "20.0", "20.0"]


def test_summary_marks_missing_seeds_and_skips_absent_tables(tmp_path, hand_rows):
    rows = [r for r in hand_rows if not (r["strategy"] == "texture" and r["seed"] == 2 and r["category"] == "cable")]
    text = write_summary(rows, tmp_path, applied="semantic").read_text()
    texture_row = table_row(section(text, "## Image AUROC", "### 1-shot"), "texture")
    assert "(n=2)" in texture_row[2] and "(n=2)" in texture_row[3]  # seed 2 lacks cable
    assert "(n=" not in texture_row[1]
    assert "Skipped: no results for `semantic` at 1 shots." in text


def test_duplicate_cells_keep_the_last_row(hand_rows):
    rerun = make_row("bottle", 1, 0, "texture", image_auroc=0.5)
    with pytest.warns(RuntimeWarning, match="duplicate"):
        summary = summarise(hand_rows + [rerun])
    assert summary.per_category[("image_auroc", "texture", 1, "bottle")].mean == pytest.approx(
        np.mean([0.5, 0.921, 0.941]))


def test_summarise_refuses_no_rows():
    with pytest.raises(ValueError, match="no result rows"):
        summarise([])


def test_plots_are_valid_pngs(tmp_path, hand_rows):
    rows = hand_rows + [make_row(c, k, s, "fusion_weighted_sum:0.5", image_auroc=0.8)
                        for c in ("bottle", "cable") for k in (1, 4) for s in range(3)]
    paths = plot_results(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["auroc_vs_shots.png", "per_category_4shot.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert 600 <= width <= 3000 and 300 <= height <= 1500


def test_an_older_file_without_verdict_columns_is_read_but_not_appended_to(tmp_path):
    path = tmp_path / "results.csv"
    append_row(path, make_row())
    lines = path.read_text().splitlines()
    keep = [i for i, c in enumerate(lines[0].split(",")) if c not in VERDICT_COLUMNS]
    old = "".join(",".join(line.split(",")[i] for i in keep) + "\n" for line in lines)
    path.write_text(old)
    (row,) = read_results(path)
    assert set(row) == set(RESULT_COLUMNS) and row["image_auroc"] == 0.9
    assert all(math.isnan(row[c]) for c in VERDICT_COLUMNS)
    for refuse in (lambda: append_row(path, make_row(seed=1)), lambda: check_appendable(path)):
        with pytest.raises(ValueError, match=r"columns differ.*missing: verdict_fpr, .*pixel_fpr; unexpected: none"):
            refuse()
    assert path.read_text() == old


def test_failures_round_trip(tmp_path):
    path = tmp_path / "failed.csv"
    append_failure(path, "cable", 4, 1, "ImageLoadError: cannot read image 'a,b.png':\n truncated file")
    append_failure(path, "cable", 4, 2, "WorkerCrashedError: the worker died")
    with open(path, "a") as f:
        f.write("cable,4,3,Wor")  # cut by a crash
    with pytest.warns(RuntimeWarning, match="unfinished"):
        failures = read_failures(path)
    assert failures == [
        {"category": "cable", "shots": 4, "seed": 1, "reason": "ImageLoadError: cannot read image 'a,b.png': truncated file"},
        {"category": "cable", "shots": 4, "seed": 2, "reason": "WorkerCrashedError: the worker died"}]
    assert path.read_text().count("\n") == 3


def test_summary_verdict_table_and_failed_cells(tmp_path, hand_rows):
    verdicts = {"verdict_fpr": 0.02, "verdict_recall": 0.8, "verdict_f1": 0.85, "verdict_balanced_accuracy": 0.89,
                "mask_iou": 0.4, "mask_dice": 0.55, "pixel_fpr": 0.0012}
    rows = [{**r, **(verdicts if r["strategy"] == "auto" else {})} for r in hand_rows]
    for r in rows:
        if r["strategy"] == "auto" and r["seed"] == 2:
            r["verdict_fpr"] = 0.05
    failures = [{"category": "cable", "shots": 4, "seed": 3, "reason": "ImageLoadError: cannot read 'x.png'"}]
    text = write_summary(rows, tmp_path, failures=failures).read_text()
    assert "**1 cell(s) failed**" in text
    table = section(text, "## Verdicts at the fitted thresholds", "### 4-shot")
    assert table_row(table, "auto")[1:] == [pct([0.02, 0.02, 0.05]), "80.0 ± 0.0", "85.0 ± 0.0", "89.0 ± 0.0",
                                            "40.0 ± 0.0", "55.0 ± 0.0", "0.12 ± 0.00"]
    with pytest.raises(AssertionError):
        table_row(table, "texture")  # no thresholds of its own: left out, not shown as zeros
    failed = section(text, "## Failed cells")
    assert table_row(failed, "cable") == ["cable", "4", "3", "ImageLoadError: cannot read 'x.png'"]
    assert "Failed cells" not in write_summary(rows, tmp_path / "ok").read_text()


def test_zero_shot_rows_have_their_own_tables_and_plot(tmp_path, hand_rows):
    zero = [make_row(c, 0, s, "zero_shot", image_auroc=v, verdict_fpr=0.1)
            for c, values in (("bottle", [0.80, 0.84, 0.82]), ("cable", [0.60, 0.62, 0.70]))
            for s, v in enumerate(values)]
    text = write_summary(hand_rows + zero, tmp_path).read_text()
    assert "shot counts 0, 1, 4" in text
    table = section(text, "## Image AUROC", "### 0-shot")
    assert table_row(table, "zero_shot")[1:] == [pct([0.80, 0.84, 0.82]), pct([0.60, 0.62, 0.70]),
                                                 pct([0.70, 0.73, 0.76])]
    with pytest.raises(AssertionError):
        table_row(table, "oracle")  # picks among few-shot strategies only
    assert table_row(section(text, "## Image AUROC", "### All categories"), "zero_shot")[1:] == \
        [pct([0.70, 0.73, 0.76]), "–", "–"]
    paper = section(text, "## astfad (`auto`) vs baseline `texture` (PatchCore)")
    assert "### 0-shot" not in paper and "### 1-shot" in paper
    verdicts = section(text, "## Verdicts at the fitted thresholds")
    assert "each batch of test images itself" in verdicts
    assert table_row(section(verdicts, "### 0-shot"), "zero_shot")[1] == "10.0 ± 0.0"
    assert "At 0 shots" not in section(write_summary(hand_rows, tmp_path / "few").read_text(),
                                       "## Verdicts at the fitted thresholds")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-positive limit on a log axis
        paths = plot_results(hand_rows + zero, tmp_path / "plots")
        alone = plot_results(zero, tmp_path / "alone")
    assert [p.name for p in paths] == ["auroc_vs_shots.png", "per_category_4shot.png"]
    assert [p.name for p in alone] == ["auroc_vs_shots.png", "per_category_0shot.png"]
    for path in paths + alone:
        with Image.open(path) as image:
            image.verify()
