"""`astfad` command line: scan | fit | predict | select | benchmark | visualize | demo."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from astfad import __version__


def _parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs into DetectorConfig overrides, values parsed as YAML scalars/lists."""
    import yaml

    from astfad.config import DetectorConfig

    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not key=value", param_hint="--set")
        out[key.strip()] = yaml.safe_load(value)
    try:
        DetectorConfig(**out)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    return out


def _say_error(message: str) -> None:
    click.echo(click.style("error: ", fg="red") + message, err=True)


def _readable_images(spec: Sequence[str]) -> list[Path]:
    """Every image the spec names that decodes; bad ones are reported and left out."""
    from astfad.data.images import ImageLoadError, list_images, load_image

    good = []
    for path in list_images(list(spec)):
        try:
            load_image(path)
            good.append(path)
        except ImageLoadError as exc:
            _say_error(f"{exc} (skipped)")
    return good


class _Group(click.Group):
    """Turn expected user errors into one red line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from astfad.backbones.weights import WeightsUnavailableError
        from astfad.data.images import ImageLoadError
        from astfad.detector import ModelFileError

        try:
            return super().invoke(ctx)
        except (FileNotFoundError, FileExistsError, ImageLoadError, ModelFileError,
                WeightsUnavailableError, ValueError) as exc:
            _say_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="astfad")
def main() -> None:
    """Few-shot industrial visual anomaly detection.

    Fit a detector on a handful of good images, then get a score, a heat map, a verdict and a
    defect mask for every new image. `astfad demo` runs the whole method on built-in data.
    """


@main.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["auto", "mvtec", "visa", "folder"]), default="auto")
@click.option("--categories", multiple=True, help="Only these categories (repeatable).")
def scan(root: Path, layout: str, categories: tuple[str, ...]) -> None:
    """Count a dataset's images per split and defect type, and list its problems."""
    from astfad.data.datasets import format_scan, scan_dataset

    click.echo(format_scan(scan_dataset(root, layout, categories or None)))


def _shots(train: Sequence[str], shots: int | None, seed: int, sampling: str) -> list[Path]:
    from astfad.data.datasets import sample_shots

    images = _readable_images(train)
    if not images:
        raise ValueError(f"no readable training image in {' '.join(train)}")
    return sample_shots(images, shots, seed, sampling) if shots else images


_train_options = [
    click.option("--train", "train", multiple=True, required=True,
                 help="Normal images: a folder, a glob or files (repeatable)."),
    click.option("--shots", type=int, default=None, help="Use k images sampled from --train."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--sampling", type=click.Choice(["random", "slice"]), default="random", show_default=True,
                 help="random: seeded choice; slice: sorted(train)[seed*k:(seed+1)*k] (AnomalyDINO)."),
    click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                 help="Detector setting, e.g. --set semantic_size=224 (repeatable)."),
]


def _with_train_options(func):
    for option in reversed(_train_options):
        func = option(func)
    return func


@main.command()
@_with_train_options
@click.option("--strategy", default="auto", show_default=True,
              help="texture | semantic | semantic_adapter | fusion_add | fusion_mul | fusion_max | "
                   "fusion_weighted_sum:<alpha> | auto")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model file to write.")
@click.option("--force", is_flag=True, help="Replace an existing model file.")
@click.option("--pinned", default=None,
              help="Strategy map (YAML/JSON file, or the preset 'paper'): the --category's entry wins over --strategy.")
@click.option("--category", default=None, help="The product category, looked up in --pinned.")
def fit(train: tuple[str, ...], shots: int | None, seed: int, sampling: str, settings: tuple[str, ...],
        strategy: str, out: Path, force: bool, pinned: str | None, category: str | None) -> None:
    """Fit a detector on normal images and save it."""
    from astfad.detector import Detector
    from astfad.selection import SelectionReport, load_pinned, pinned_strategy

    config = _parse_settings(settings)
    if pinned is not None:
        if category is None:
            raise click.BadParameter("--pinned needs --category", param_hint="--category")
        strategy = pinned_strategy(category, load_pinned(pinned)) or strategy
        click.echo(f"category '{category}': strategy {strategy} (from {pinned})")
    if out.exists() and not force:
        raise FileExistsError(f"'{out}' exists; choose another --out or pass --force")
    paths = _shots(train, shots, seed, sampling)
    click.echo(f"fitting '{strategy}' on {len(paths)} normal image(s)")
    det = Detector(strategy, **{"seed": seed, **config}).fit(paths)
    if det.selection:
        click.echo(SelectionReport.from_dict(det.selection).format())
    det.save(out, overwrite=force)
    click.echo(f"strategy {det.strategy}, image threshold {det.threshold:.4g}, "
               f"fitted in {det.fit_seconds:.1f} s -> {out}")


@main.command()
@_with_train_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also save the detector.")
def select(train: tuple[str, ...], shots: int | None, seed: int, sampling: str, settings: tuple[str, ...],
           out: Path | None) -> None:
    """Run the expert selection alone and print its evidence."""
    from astfad.detector import Detector
    from astfad.selection import SelectionReport

    config = _parse_settings(settings)
    if out is not None and out.exists():
        raise FileExistsError(f"'{out}' exists; choose another --out")
    paths = _shots(train, shots, seed, sampling)
    det = Detector("auto", **{"seed": seed, **config}).fit(paths)
    click.echo(SelectionReport.from_dict(det.selection).format())
    if out is not None:
        det.save(out)
        click.echo(f"saved -> {out}")


PREDICT_CHUNK = 16


def _unique_name(stem: str, used: set[str]) -> str:
    """A file stem not yet used in this run (two folders may hold the same file name)."""
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--force", is_flag=True, help="Replace an earlier predictions.csv in --out.")
def predict(model: Path, images: tuple[str, ...], out: Path, force: bool) -> None:
    """Score images: predictions.csv, heat-map overlays and binary masks in --out."""
    from PIL import Image

    from astfad.data.images import ImageLoadError, list_images, load_image
    from astfad.detector import Detector
    from astfad.visualize import overlay, save_mask

    det = Detector.load(model)
    paths = list_images(list(images))
    table = out / "predictions.csv"
    if table.exists() and not force:
        raise FileExistsError(f"'{table}' exists; choose another --out or pass --force")
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    norm = det.normalisers["applied"]
    vmin, vmax = norm.center, max(det.pixel_threshold, norm.center + 4 * norm.scale)
    used: set[str] = set()
    counts = {"anomalous": 0, "normal": 0, "error": 0}
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "score", "verdict", "error"])
        for start in range(0, len(paths), PREDICT_CHUNK):
            loaded = []
            for path in paths[start:start + PREDICT_CHUNK]:
                try:
                    loaded.append((path, load_image(path)))
                except ImageLoadError as exc:
                    _say_error(f"{exc} (skipped)")
                    writer.writerow([str(path), "", "error", str(exc)])
                    counts["error"] += 1
            preds = det.predict([image for _, image in loaded]) if loaded else []
            for (path, image), pred in zip(loaded, preds):
                verdict = "anomalous" if pred.is_anomalous else "normal"
                counts[verdict] += 1
                writer.writerow([str(path), f"{pred.score:.6g}", verdict, ""])
                name = _unique_name(path.stem, used)
                Image.fromarray(overlay(image, pred.anomaly_map, vmin, vmax)).save(out / "overlays" / f"{name}.png")
                save_mask(pred.mask, out / "masks" / f"{name}.png")
    click.echo(f"{len(paths)} image(s): {counts['anomalous']} anomalous, {counts['normal']} normal, "
               f"{counts['error']} unreadable -> {table}")


def _find_truth(path: Path, masks: Path | None) -> Path | None:
    """A ground-truth mask for an image: in --masks by stem, or MVTec's ground_truth folder."""
    candidates = []
    if masks is not None:
        candidates += [masks / f"{path.stem}_mask.png", masks / f"{path.stem}.png"]
    if len(path.parents) >= 3:
        gt = path.parents[2] / "ground_truth" / path.parent.name
        candidates += [gt / f"{path.stem}_mask.png", gt / f"{path.stem}.png"]
    return next((c for c in candidates if c.is_file()), None)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the panels.")
@click.option("--masks", type=click.Path(path_type=Path), default=None, help="Folder of ground-truth masks.")
def visualize(model: Path, images: tuple[str, ...], out: Path, masks: Path | None) -> None:
    """Comparison panels: image | truth | texture | semantic | semantic_adapter | applied."""
    from astfad.data.images import ImageLoadError, list_images, load_image, load_mask
    from astfad.detector import Detector
    from astfad.visualize import zscore_panel

    det = Detector.load(model)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path in list_images(list(images)):
        try:
            image = load_image(path)
            truth_path = _find_truth(path, masks)
            truth = load_mask(truth_path, image.shape[:2], path) if truth_path else None
        except ImageLoadError as exc:
            _say_error(f"{exc} (skipped)")
            continue
        feats = det.extract([image], strategy="all")
        expert_maps = det.expert_maps(feats)
        applied = det.combine(det.strategy, expert_maps)
        score = float(det.scores(det.strategy, applied, feats.get("texture"))[0])
        maps = det.display_maps({n: m[0] for n, m in expert_maps.items()}, applied[0])
        verdict = "anomalous" if score > det.threshold else "normal"
        name = _unique_name(path.stem, used)
        zscore_panel(image, {k: v.numpy() for k, v in maps.items()}, truth,
                     f"{path.name}: score {score:.3g} ({verdict}, threshold {det.threshold:.3g})",
                     out / f"{name}.png")
        click.echo(f"{path} -> {out / (name + '.png')}")


def _run_benchmark(spec) -> Path:
    from astfad.benchmark import Benchmark, write_reports

    start = time.perf_counter()
    rows = Benchmark(spec, log=click.echo).run()
    if not rows:
        raise ValueError(f"no finished cells in '{spec.out}'; see {spec.out / 'benchmark.log'}")
    paths = write_reports(spec.out, rows)
    click.echo(f"benchmark finished in {time.perf_counter() - start:.0f} s")
    return paths[0]


@main.command()
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Dataset root.")
@click.option("--layout", type=click.Choice(["auto", "mvtec", "visa", "folder"]), default="auto")
@click.option("--categories", multiple=True, help="Only these categories (repeatable).")
@click.option("--shots", multiple=True, default=("1", "4"), show_default=True, help="Shot counts, e.g. 1,2,4,8.")
@click.option("--seeds", multiple=True, default=("0",), show_default=True, help="Seeds, e.g. 0,1,2.")
@click.option("--strategies", multiple=True, default=None,
              help="Strategies to evaluate (repeatable; default: every fixed one and auto; "
                   "'preset' applies --pinned).")
@click.option("--pinned", default=None, help="Strategy map: a YAML/JSON file or a preset ('paper').")
@click.option("--sampling", type=click.Choice(["random", "slice"]), default="random", show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Detector setting (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Results folder (resumable).")
def benchmark(data: Path, layout: str, categories: tuple[str, ...], shots: tuple[str, ...],
              seeds: tuple[str, ...], strategies: tuple[str, ...], pinned: str | None, sampling: str,
              settings: tuple[str, ...], out: Path) -> None:
    """Evaluate strategies over categories, shot counts and seeds; rerun to resume."""
    from astfad.benchmark import FIXED_STRATEGIES, BenchmarkSpec

    spec = BenchmarkSpec(data=data, out=out, layout=layout, categories=_split(categories) or None,
                         shots=_ints(shots, "--shots"), seeds=_ints(seeds, "--seeds"),
                         strategies=_split(strategies) or (*FIXED_STRATEGIES, "auto"),
                         sampling=sampling, pinned=pinned, config=_parse_settings(settings))
    summary = _run_benchmark(spec)
    click.echo(f"report: {summary}")


def _split(values: Sequence[str]) -> tuple[str, ...]:
    """Accept both `--shots 1 --shots 4` and `--shots 1,4`."""
    return tuple(x.strip() for v in values or () for x in v.split(",") if x.strip())


def _ints(values: Sequence[str], option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _split(values))
    except ValueError:
        raise click.BadParameter(f"expected whole numbers, got {' '.join(values)}", param_hint=option) from None


DEMO_SETTINGS = {"semantic_size": 224, "texture_size": 256}


@main.command()
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Run on this dataset instead of the built-in synthetic one.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("astfad-demo"), show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Detector setting (repeatable).")
def demo(data: Path | None, out: Path, settings: tuple[str, ...]) -> None:
    """The whole method end to end: (synthetic) data, every strategy and auto at 1 and 4 shots."""
    from astfad.benchmark import FIXED_STRATEGIES, BenchmarkSpec
    from astfad.data.synthetic import generate_synthetic_dataset

    if data is None:
        data = generate_synthetic_dataset(out / "data")
        click.echo(f"synthetic dataset: {data}")
        config = {**DEMO_SETTINGS, **_parse_settings(settings)}
    else:
        config = _parse_settings(settings)
    spec = BenchmarkSpec(data=data, out=out / "results", shots=(1, 4), seeds=(0,),
                         strategies=(*FIXED_STRATEGIES, "auto"), config=config)
    summary = _run_benchmark(spec)
    text = summary.read_text()
    click.echo(text)
    click.echo(f"report: {summary}\nplots: {spec.out}/*.png\npanels: {spec.out / 'panels'}")
