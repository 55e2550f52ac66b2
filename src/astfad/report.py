"""Benchmark results: the `results.csv` contract, its Markdown summary and its plots.

`results.csv` is written one finished cell (category, shots, seed, strategy) at a time by
`append_row`, flushed and fsynced, so an interrupted benchmark keeps every finished cell and can
resume from the file. Cells that could not run go to `failed.csv` the same way (`append_failure`).
`summarise` turns rows into seed statistics; `write_summary` and `plot_results` only render those
statistics, so the tables and the figures always agree.

Files written by an older astfad, without the columns added since (the verdict columns), are
still read (the missing values are NaN) but never appended to, so one file never mixes formats.

Aggregation rule used everywhere: a per-category value is the mean ± sample std (ddof=1) over
seeds; an all-category value is, for each seed, the mean over categories (NaN metrics skipped),
then the mean ± std of those per-seed means over seeds. A seed only enters an all-category value
when the strategy has a row for every category of that shot count, so strategies are compared on
the same categories.

Shot count 0 holds zero-shot rows (no normal image: test images scored against each other): it
has its columns and tables like any shot count, is left out of the paper-style table (no baseline
runs without normal images), and the per-category figure shows it beside the largest shot count.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from astfad.config import DEFAULT_PAIR, FUSION_RULES, SINGLE_STRATEGIES, experts_of, parse_strategy
from astfad.metrics import VERDICT_KEYS

__all__ = [
    "RESULT_COLUMNS",
    "METRIC_COLUMNS",
    "VERDICT_COLUMNS",
    "FAILURE_COLUMNS",
    "Stat",
    "Summary",
    "append_row",
    "read_results",
    "check_appendable",
    "append_failure",
    "read_failures",
    "order_strategies",
    "summarise",
    "write_summary",
    "plot_results",
]

# the decisions at the fitted thresholds (metrics.verdict_metrics), NaN where a strategy has none
VERDICT_COLUMNS: tuple[str, ...] = VERDICT_KEYS
RESULT_COLUMNS: tuple[str, ...] = (
    "category", "shots", "seed", "strategy", "applied_strategy",
    "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap",
    *VERDICT_COLUMNS,
    "fit_seconds", "predict_seconds_per_image", "shot_files",
)
METRIC_COLUMNS: tuple[str, ...] = (
    "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap",
    *VERDICT_COLUMNS,
)
FAILURE_COLUMNS: tuple[str, ...] = ("category", "shots", "seed", "reason")
SELECTION_COLUMNS: tuple[str, ...] = ("category", "shots", "seed", "choice", "terms")
_INT_COLUMNS = ("shots", "seed")
_FLOAT_COLUMNS = METRIC_COLUMNS + ("fit_seconds", "predict_seconds_per_image")
_TABLE_METRICS = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "aupro": "AUPRO"}
_VERDICT_TABLE = {"verdict_fpr": ("FPR (good images)", 1), "verdict_recall": ("Recall (defective)", 1),
                  "verdict_f1": ("F1", 1), "verdict_balanced_accuracy": ("Balanced accuracy", 1),
                  "mask_iou": ("Mask IoU", 1), "mask_dice": ("Mask Dice", 1),
                  "pixel_fpr": ("Pixel FPR (good images)", 2)}
_NO_VALUE = "–"
_DPI = 120


# ----------------------------------------------------------------------------- results.csv

def _format_value(column: str, value: Any) -> str:
    """One CSV field: ints as ints, floats with 6 significant digits, NaN/None as `nan`."""
    if column in _INT_COLUMNS:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"column '{column}' must be an integer, got {value!r}")
        return str(int(value))
    if column in _FLOAT_COLUMNS:
        number = math.nan if value is None else float(value)
        return "nan" if math.isnan(number) else f"{number:.6g}"
    if column == "shot_files" and not isinstance(value, str):
        return ";".join(str(name) for name in value)
    return str(value)


def _csv_line(fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue()


_HEADER_LINE = _csv_line(RESULT_COLUMNS)


def _header_problem(path: Path, header: str, columns: Sequence[str]) -> str:
    found = next(csv.reader([header]), [])
    missing = [c for c in columns if c not in found]
    unexpected = [c for c in found if c not in columns]
    return (f"{path}: its columns differ from this astfad's (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(unexpected) or 'none'}; an older astfad wrote it?): "
            "write to a new file (another --out) instead of appending")


def _append_line(path: Path, columns: Sequence[str], line: bytes) -> None:
    """Append one CSV line under `columns`' header, durably: a last line without its newline (a
    write cut by a crash) is dropped first, a file with another header is refused, and the line
    is written in one call, flushed and fsynced (the directory entry too when the file is new)."""
    header = _csv_line(columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                size = f.read().rfind(b"\n") + 1
                f.truncate(size)
        if size:
            f.seek(0)
            found = f.readline().decode()
            if found != header:
                raise ValueError(_header_problem(path, found, columns))
        else:
            line = header.encode() + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if created and os.name == "posix":  # make the new directory entry durable too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one finished cell to results.csv, creating it with the header when new or empty.

    The row must have exactly the `RESULT_COLUMNS` keys (`shot_files` may be a list of names).
    The line is written in one call, then flushed and fsynced, so a crash loses nothing finished.
    A last line without its newline (a write cut by a crash) is an unfinished row: it is dropped
    before appending, since the benchmark recomputes that cell. A file with other columns (an
    older format) is refused: read it, but start a new one.
    """
    missing = [c for c in RESULT_COLUMNS if c not in row]
    extra = [c for c in row if c not in RESULT_COLUMNS]
    if missing or extra:
        raise ValueError(f"result row does not match RESULT_COLUMNS: missing {missing}, unexpected {extra}")
    _append_line(path, RESULT_COLUMNS, _csv_line([_format_value(c, row[c]) for c in RESULT_COLUMNS]).encode())


def check_appendable(path: Path) -> None:
    """Raise ValueError, before any work, when `append_row` would refuse this results.csv."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with open(path, encoding="utf-8") as f:
            found = f.readline()
        if found != _HEADER_LINE:
            raise ValueError(_header_problem(path, found, RESULT_COLUMNS))


def append_failure(path: Path, category: str, shots: int, seed: int, reason: str) -> None:
    """Record a (category, shots, seed) cell that could not run, as durably as a result row."""
    fields = [category, str(int(shots)), str(int(seed)), " ".join(str(reason).split())]
    _append_line(path, FAILURE_COLUMNS, _csv_line(fields).encode())


def append_selection(path: Path, category: str, shots: int, seed: int, record: dict[str, Any]) -> None:
    """Record an `auto` cell's choice and validation terms (JSON in one column), as durably as a
    result row."""
    fields = [category, str(int(shots)), str(int(seed)), str(record["choice"]),
              json.dumps(record["terms"], separators=(",", ":"), allow_nan=True)]
    _append_line(path, SELECTION_COLUMNS, _csv_line(fields).encode())


def read_selections(path: Path) -> list[dict[str, Any]]:
    """Records of a selection.csv (the latest per cell last), terms as arrays."""
    return [{"category": r[0], "shots": int(r[1]), "seed": int(r[2]), "choice": r[3],
             "terms": {name: {k: np.asarray(v, float) for k, v in term.items()} for name, term in json.loads(r[4]).items()}}
            for r in _records_under(Path(path), SELECTION_COLUMNS)]


def read_failures(path: Path) -> list[dict[str, Any]]:
    """Rows of a failed.csv (latest record per cell last); an unfinished last line is skipped."""
    return [{"category": r[0], "shots": int(r[1]), "seed": int(r[2]), "reason": r[3]}
            for r in _records_under(Path(path), FAILURE_COLUMNS)]


def _parse_value(column: str, text: str) -> Any:
    if column in _INT_COLUMNS:
        return int(text)
    if column in _FLOAT_COLUMNS:
        return math.nan if text.strip() == "" else float(text)
    return text


def _records_under(path: Path, columns: Sequence[str]) -> list[list[str]]:
    """The complete records of a file written by `_append_line` under `columns` (none for an empty
    file); a file with another header is refused."""
    records = _read_records(path, stacklevel=4)
    if records and tuple(records[0]) != tuple(columns):
        raise ValueError(f"{path}: its columns differ from {', '.join(columns)}")
    return [r for r in records[1:] if len(r) == len(columns)]


def _read_records(path: Path, stacklevel: int = 3) -> list[list[str]]:
    """CSV records of a file; a last line without newline (an interrupted write) is skipped with
    a warning."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        warnings.warn(f"{path}: ignoring an unfinished last line (interrupted write)", RuntimeWarning,
                      stacklevel=stacklevel)
        text = text[: text.rfind("\n") + 1]
    return list(csv.reader(io.StringIO(text)))


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a results.csv: ints for shots/seed, floats for metrics and times (empty or `nan`
    -> NaN), strings otherwise, every `RESULT_COLUMNS` key present. A last line without newline,
    left by an interrupted write, is skipped with a warning. An older file that lacks some metric
    or time columns reads with NaN there; any other header raises ValueError."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        return []
    header = tuple(records[0])
    unknown = [c for c in header if c not in RESULT_COLUMNS]
    required = [c for c in RESULT_COLUMNS if c not in _FLOAT_COLUMNS and c not in header]
    if unknown or required or len(set(header)) != len(header):
        raise ValueError(f"{path}: its columns differ from RESULT_COLUMNS "
                         f"(expected {', '.join(RESULT_COLUMNS)}; found {', '.join(header)})")
    absent = {c: math.nan for c in RESULT_COLUMNS if c not in header}
    rows = []
    for line_number, record in enumerate(records[1:], start=2):
        if len(record) != len(header):
            raise ValueError(f"{path}:{line_number}: {len(record)} fields, expected {len(header)}")
        try:
            values = {c: _parse_value(c, v) for c, v in zip(header, record)}
        except ValueError as exc:
            raise ValueError(f"{path}:{line_number}: {exc}") from None
        rows.append({c: values[c] if c in values else absent[c] for c in RESULT_COLUMNS})
    return rows


# ----------------------------------------------------------------------------- statistics

def _strategy_key(name: str) -> tuple[int, tuple[int, ...], int, float, str]:
    """Singles in registry order; fusions by pair (the default pair first), then rule, then alpha."""
    if name in SINGLE_STRATEGIES:
        return 0, (SINGLE_STRATEGIES.index(name),), 0, 0.0, ""
    if name.startswith("fusion_"):
        try:
            rule, alpha = parse_strategy(name)
            pair = experts_of(name)
        except ValueError:
            return 4, (), 0, 0.0, name
        rank = () if pair == DEFAULT_PAIR else tuple(SINGLE_STRATEGIES.index(e) for e in pair)
        return 1, rank, FUSION_RULES.index(rule), alpha or 0.0, name
    group = {"auto": 2, "oracle": 5}.get(name, 3 if name.startswith("preset:") else 4)
    return group, (), 0, 0.0, name if group in (3, 4) else ""


def order_strategies(names: Iterable[str]) -> list[str]:
    """Distinct strategy names in reading order: single experts, fusions (grouped by pair, weighted
    sums by alpha), auto, presets, anything else, and the oracle (an upper bound) last."""
    return sorted(set(names), key=_strategy_key)


@dataclass(frozen=True)
class Stat:
    """A value over seeds, as a fraction: mean and sample std (NaN with one seed), n seeds used."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, 0)
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        return cls(float(np.mean(finite)), std, len(finite))


@dataclass(frozen=True)
class Summary:
    """Seed statistics of a benchmark, keyed by (metric, strategy, shots[, category]).

    `per_category` holds mean ± std over seeds of one category; `overall` the all-category value
    (per seed the mean over categories, then over seeds). `seeds[shots]` are the seeds present at
    that shot count; `timing[(strategy, shots)]` = (mean fit s, mean predict s per image);
    `applied[(strategy, shots, category)]` counts the strategies actually applied over seeds.
    """

    strategies: tuple[str, ...]
    categories: dict[int, tuple[str, ...]]
    seeds: dict[int, tuple[int, ...]]
    per_category: dict[tuple[str, str, int, str], Stat]
    overall: dict[tuple[str, str, int], Stat]
    timing: dict[tuple[str, int], tuple[float, float]]
    applied: dict[tuple[str, int, str], Counter[str]]

    @property
    def shots(self) -> tuple[int, ...]:
        return tuple(sorted(self.categories))

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return tuple(sorted({s for seeds in self.seeds.values() for s in seeds}))

    @property
    def all_categories(self) -> tuple[str, ...]:
        return tuple(sorted({c for cats in self.categories.values() for c in cats}))


def _float(value: Any) -> float:
    return math.nan if value is None or value == "" else float(value)


def summarise(rows: Iterable[Mapping[str, Any]]) -> Summary:
    """Aggregate result rows (from `read_results` or the benchmark) over seeds and categories.

    A cell that appears twice (a re-run) keeps its last row, with a warning."""
    cells: dict[tuple[str, int, int, str], Mapping[str, Any]] = {}
    for row in rows:
        key = (row["strategy"], int(row["shots"]), int(row["seed"]), row["category"])
        if key in cells:
            warnings.warn(f"duplicate result for strategy={key[0]} shots={key[1]} seed={key[2]} "
                          f"category={key[3]}: keeping the last row", RuntimeWarning, stacklevel=2)
        cells[key] = row
    if not cells:
        raise ValueError("no result rows to summarise")

    strategies = tuple(order_strategies(k[0] for k in cells))
    shot_counts = sorted({k[1] for k in cells})
    categories = {k: tuple(sorted({c[3] for c in cells if c[1] == k})) for k in shot_counts}
    seeds = {k: tuple(sorted({c[2] for c in cells if c[1] == k})) for k in shot_counts}

    per_category: dict[tuple[str, str, int, str], Stat] = {}
    overall: dict[tuple[str, str, int], Stat] = {}
    timing: dict[tuple[str, int], tuple[float, float]] = {}
    applied: dict[tuple[str, int, str], Counter[str]] = {}
    for strategy in strategies:
        for k in shot_counts:
            present = {(s, c): row for (st, kk, s, c), row in cells.items() if st == strategy and kk == k}
            if not present:
                continue
            for category in categories[k]:
                chosen = Counter(str(row["applied_strategy"]) for (_, c), row in present.items() if c == category)
                if chosen:
                    applied[(strategy, k, category)] = chosen
            complete = [s for s in seeds[k] if all((s, c) in present for c in categories[k])]
            for metric in METRIC_COLUMNS:
                for category in categories[k]:
                    values = [_float(row.get(metric)) for (_, c), row in present.items() if c == category]
                    if values:
                        per_category[(metric, strategy, k, category)] = Stat.of(values)
                per_seed = []
                for s in complete:
                    values = [v for c in categories[k] if math.isfinite(v := _float(present[(s, c)].get(metric)))]
                    per_seed.append(float(np.mean(values)) if values else math.nan)
                overall[(metric, strategy, k)] = Stat.of(per_seed)
            timing[(strategy, k)] = (_nanmean(_float(row["fit_seconds"]) for row in present.values()),
                                     _nanmean(_float(row["predict_seconds_per_image"]) for row in present.values()))
    return Summary(strategies, categories, seeds, per_category, overall, timing, applied)


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# ----------------------------------------------------------------------------- summary.md

def _pct(stat: Stat | None, total_seeds: int, with_std: bool = True, digits: int = 1) -> str:
    """`91.2 ± 0.8` in percent; `(n=2)` when fewer seeds than the run has; `–` without a value."""
    if stat is None or stat.n == 0:
        return _NO_VALUE
    text = f"{100 * stat.mean:.{digits}f}"
    if with_std and stat.n > 1:
        text += f" ± {100 * stat.std:.{digits}f}"
    if stat.n < total_seeds:
        text += f" (n={stat.n})"
    return text


def _best(stats: dict[str, Stat | None]) -> set[str]:
    """Strategies holding the best mean at the shown precision; the oracle, which picks with test
    labels, does not compete, and a column with a single contender has no 'best'."""
    shown = {s: round(100 * st.mean, 1) for s, st in stats.items()
             if st is not None and st.n and s != "oracle"}
    if len(shown) < 2:
        return set()
    top = max(shown.values())
    return {s for s, v in shown.items() if v == top}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], body: Iterable[Sequence[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first `text_columns` left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join([" --- "] * text_columns + [" ---: "] * (len(header) - text_columns)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]
    return lines + [""]


def _stat_table(columns: Sequence[str], stats: dict[str, dict[str, Stat | None]],
                strategies: Sequence[str], total_seeds: int) -> list[str]:
    """Rows = strategies, one column per key of `columns`, best per column in bold."""
    best = {col: _best({s: stats[s][col] for s in strategies}) for col in columns}
    body = []
    for s in strategies:
        cells = [_pct(stats[s][col], total_seeds) for col in columns]
        body.append([s] + [f"**{v}**" if s in best[col] else v for v, col in zip(cells, columns)])
    return _table(["Strategy"] + list(columns), body)


def _choices(counts: Counter[str]) -> str:
    total = sum(counts.values())
    ordered = sorted(counts.items(), key=lambda item: (-item[1], _strategy_key(item[0])))
    return ", ".join(f"{name} ({n}/{total})" for name, n in ordered)


def _metric_section(summary: Summary, metric: str, title: str) -> list[str]:
    lines = [f"## {title}", "", "### All categories", ""]
    shots = summary.shots
    active = [s for s in summary.strategies if any((metric, s, k) in summary.overall for k in shots)]
    stats = {s: {f"{k}-shot": summary.overall.get((metric, s, k)) for k in shots} for s in active}
    lines += _stat_table([f"{k}-shot" for k in shots], stats, active, len(summary.all_seeds))
    for k in shots:
        cats = summary.categories[k]
        present = [s for s in summary.strategies if (metric, s, k) in summary.overall]
        stats = {s: {c: summary.per_category.get((metric, s, k, c)) for c in cats} for s in present}
        for s in present:
            stats[s]["mean"] = summary.overall[(metric, s, k)]
        lines += [f"### {k}-shot", ""]
        lines += _stat_table(list(cats) + ["mean"], stats, present, len(summary.seeds[k]))
    return lines


def _paper_section(summary: Summary, baseline: str, applied: str) -> list[str]:
    baseline_name = f"`{baseline}` (PatchCore)" if baseline == "texture" else f"`{baseline}`"
    lines = [f"## astfad (`{applied}`) vs baseline {baseline_name}", "",
             f"The seed paper's table form. astfad = strategy `{applied}`; Applied Strategy lists what "
             "it applied over the seeds; values are means over seeds in percent; the Mean row is "
             "computed as the all-category values above.", ""]
    header = ["Category", "Applied Strategy", "Image AUROC (astfad)", "Baseline Image AUROC",
              "Pixel AUROC (astfad)", "Baseline Pixel AUROC"]
    shots = [k for k in summary.shots if k > 0]  # nothing to compare with at 0 shots
    if not shots:
        return []
    for k in shots:
        lines += [f"### {k}-shot", ""]
        absent = [s for s in (applied, baseline) if (("image_auroc", s, k) not in summary.overall)]
        if absent:
            lines += [f"Skipped: no results for {', '.join(f'`{s}`' for s in absent)} at {k} shots.", ""]
            continue
        n_seeds = len(summary.seeds[k])
        body = []
        for c in summary.categories[k]:
            body.append([c, _choices(summary.applied.get((applied, k, c), Counter())) or _NO_VALUE]
                        + [_pct(summary.per_category.get((m, s, k, c)), n_seeds, with_std=False)
                           for m in ("image_auroc", "pixel_auroc") for s in (applied, baseline)])
        total = sum((summary.applied.get((applied, k, c), Counter()) for c in summary.categories[k]),
                    Counter())
        body.append(["**Mean**", _choices(total)]
                    + [_pct(summary.overall[(m, s, k)], n_seeds, with_std=False)
                       for m in ("image_auroc", "pixel_auroc") for s in (applied, baseline)])
        lines += _table(header, body, text_columns=2)
    return lines


def _timing_section(summary: Summary) -> list[str]:
    shots = summary.shots
    header = ["Strategy"] + [f"Fit s ({k}-shot)" for k in shots] + [f"Predict ms/image ({k}-shot)" for k in shots]
    body = []
    for s in summary.strategies:
        times = [summary.timing.get((s, k), (math.nan, math.nan)) for k in shots]
        body.append([s] + [_NO_VALUE if math.isnan(t[0]) else f"{t[0]:.2f}" for t in times]
                    + [_NO_VALUE if math.isnan(t[1]) else f"{1000 * t[1]:.1f}" for t in times])
    return ["## Timing", "",
            "Mean over all cells (categories and seeds) of the times the benchmark recorded.", ""] \
        + _table(header, body)


def _verdict_section(summary: Summary) -> list[str]:
    lines = ["## Verdicts at the fitted thresholds", "",
             "What a line acts on: each strategy's yes/no verdict at its own fitted image threshold and "
             "its defect mask at its fitted pixel threshold. FPR: share of good test images called "
             "anomalous (lower is better); recall: share of defective ones called anomalous; F1 and "
             "balanced accuracy of the verdicts (an always-anomalous verdict has FPR 100 and balanced "
             "accuracy 50); mask IoU and Dice: per defective image with a ground-truth mask, then "
             "averaged; pixel FPR: share of the pixels of good images inside the mask (lower is "
             "better). Values are means over categories and seeds as above; strategies without a "
             "threshold of their own are left out."
             + (" At 0 shots there is no normal image: the thresholds come from each batch of test "
                "images itself (robustly), so a verdict there means \"unusual within its batch\"."
                if 0 in summary.shots else ""), ""]
    columns = list(_VERDICT_TABLE)
    for k in summary.shots:
        present = [s for s in summary.strategies
                   if any(summary.overall.get((m, s, k), Stat.of([])).n for m in columns)]
        lines += [f"### {k}-shot", ""]
        if not present:
            lines += ["No strategy has fitted thresholds at this shot count.", ""]
            continue
        n_seeds = len(summary.seeds[k])
        body = [[s] + [_pct(summary.overall.get((m, s, k)), n_seeds, digits=_VERDICT_TABLE[m][1])
                       for m in columns] for s in present]
        lines += _table(["Strategy"] + [_VERDICT_TABLE[m][0] for m in columns], body)
    return lines


def _failure_section(failures: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [[f["category"], str(f["shots"]), str(f["seed"]), f["reason"]] for f in failures]
    return (["## Failed cells", "",
             "These (category, shots, seed) cells could not run, so every table above lacks them; "
             "rerun the benchmark to retry them.", ""]
            + _table(["Category", "Shots", "Seed", "Reason"], body, text_columns=4))


def write_summary(rows: Iterable[Mapping[str, Any]], out_dir: Path, baseline: str = "texture",
                  applied: str = "auto", failures: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write `out_dir/summary.md`: per-metric tables, the paper-style `applied` vs `baseline`
    table per shot count, the verdicts at the fitted thresholds, timings, and the cells that
    failed (`failures`: dicts with category, shots, seed, reason). Returns the file's path."""
    summary = summarise(rows)
    seeds = summary.all_seeds
    failed = (f" **{len(failures)} cell(s) failed** (see Failed cells at the end)." if failures else "")
    lines = [
        "# astfad benchmark summary", "",
        f"{len(summary.all_categories)} categories ({', '.join(summary.all_categories)}); "
        f"shot counts {', '.join(map(str, summary.shots))}; {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); {len(summary.strategies)} strategies.{failed}", "",
        "How to read: values are percentages. A category cell is the mean ± standard deviation over "
        "seeds (sample std, ddof=1; no ± with one seed) of that category's metric. The `mean` column "
        "and the all-category tables take, for each seed, the mean over categories (categories whose "
        "metric is undefined, NaN, are skipped), then the mean ± std of these per-seed means over "
        "seeds; a seed counts only where the strategy has a result for every category of that shot "
        "count. `(n=2)` marks a value over fewer seeds than the run has; `–` means no value. Bold: the "
        "best value of a column (ties at the shown precision all bold); `oracle` picks with test "
        "labels, so it is an upper bound and never bold.", "",
    ]
    for metric, title in _TABLE_METRICS.items():
        lines += _metric_section(summary, metric, title)
    lines += _paper_section(summary, baseline, applied)
    lines += _verdict_section(summary)
    lines += _timing_section(summary)
    if failures:
        lines += _failure_section(failures)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- plots

def _colours(strategies: Sequence[str]) -> dict[str, Any]:
    """One colour per strategy, the same in every figure."""
    palette = colormaps["tab10" if len(strategies) <= 10 else "tab20"].colors
    return {s: palette[i % len(palette)] for i, s in enumerate(strategies)}


def _legend_below(fig: Figure, handles: list, labels: list[str]) -> None:
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), frameon=False)


def plot_results(rows: Iterable[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """Write `auroc_vs_shots.png` (image and pixel AUROC over categories vs shots, error bars =
    std over seeds; a log axis, linear below 1 shot when 0 shots are present) and
    `per_category_<k>shot.png` (image AUROC per category for the largest shot count, with the
    0-shot strategies beside it). Values in percent; returns the paths."""
    summary = summarise(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = _colours(summary.strategies)
    shots = summary.shots

    fig = Figure(figsize=(11, 5), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, 2, sharey=False)
    handles: dict[str, Any] = {}
    for ax, metric, title in zip(axes, ("image_auroc", "pixel_auroc"), ("Image AUROC", "Pixel AUROC")):
        for i, s in enumerate(summary.strategies):
            points = [(k, summary.overall[(metric, s, k)]) for k in shots
                      if (metric, s, k) in summary.overall and summary.overall[(metric, s, k)].n]
            if not points:
                continue
            offset = 0.025 * (i - (len(summary.strategies) - 1) / 2)  # keeps error bars apart
            handles[s] = ax.errorbar(
                [k * 2 ** offset if k else offset for k, _ in points], [100 * st.mean for _, st in points],
                yerr=[0.0 if math.isnan(st.std) else 100 * st.std for _, st in points],
                color=colours[s], marker="o", capsize=3, linestyle="--" if s == "oracle" else "-")
        if min(shots) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(shots) / 1.4, max(shots) * 1.4)
        else:  # 0 shots: linear up to 1, log above
            ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
            ax.set_xlim(-0.3, max(1, max(shots)) * 1.4)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("shots (normal images)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{title}, mean over categories")
        ax.grid(alpha=0.3)
    ordered = [s for s in summary.strategies if s in handles]
    _legend_below(fig, [handles[s] for s in ordered], ordered)
    curve_path = out_dir / "auroc_vs_shots.png"
    fig.savefig(curve_path, dpi=_DPI)

    k = max(shots)
    groups = list(summary.categories[k]) + ["mean"]
    present = [(s, k) for s in summary.strategies if ("image_auroc", s, k) in summary.overall]
    if k > 0:
        present += [(s, 0) for s in summary.strategies if ("image_auroc", s, 0) in summary.overall]
    width = 0.8 / len(present)
    fig = Figure(figsize=(min(24.0, max(8.0, 0.22 * len(groups) * len(present) + 2)), 5.5),
                 dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    values_seen = []
    bars = []
    for i, (s, at) in enumerate(present):
        stats = [summary.per_category.get(("image_auroc", s, at, c)) for c in groups[:-1]]
        stats.append(summary.overall[("image_auroc", s, at)])
        means = [100 * st.mean if st and st.n else math.nan for st in stats]
        errors = [100 * st.std if st and st.n > 1 else 0.0 for st in stats]
        values_seen += [m for m in means if math.isfinite(m)]
        x = np.arange(len(groups)) + (i - (len(present) - 1) / 2) * width
        bars.append(ax.bar(x, means, width, yerr=errors, color=colours[s], capsize=2,
                           error_kw={"linewidth": 0.8}, hatch="//" if s == "oracle" else None))
    low = min(values_seen, default=50.0)
    ax.set_ylim(min(50.0, 10 * math.floor((low - 2) / 10)), 100.5)  # 50 = chance level
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("Image AUROC (%)")
    ax.set_title(f"Image AUROC per category, {k}-shot (mean over {len(summary.seeds[k])} seeds, "
                 "error bars = std)")
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, bars, [s if at == k else f"{s} ({at}-shot)" for s, at in present])
    bar_path = out_dir / f"per_category_{k}shot.png"
    fig.savefig(bar_path, dpi=_DPI)
    return [curve_path, bar_path]
