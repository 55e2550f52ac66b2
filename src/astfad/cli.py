"""`astfad` command line: scan | fit | predict | calibrate | select | benchmark | visualize | demo."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from astfad import __version__


def _parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs into DetectorConfig overrides, values parsed as YAML scalars/lists and
    checked against DetectorConfig's field types (an error names the key and the type)."""
    import yaml

    from astfad.config import DetectorConfig
    from astfad.modelfile import check_config_values

    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not key=value", param_hint="--set")
        key, parsed = key.strip(), yaml.safe_load(value)
        try:
            check_config_values({key: parsed})
        except ValueError:
            try:  # YAML reads 1e-3 as a string; a number field takes it as the number it is
                parsed = float(parsed) if isinstance(parsed, str) else parsed
            except ValueError:
                pass
        out[key] = parsed
    try:
        check_config_values(out)
        DetectorConfig.from_dict(out)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    return out


def _say_error(message: str) -> None:
    click.echo(click.style("error: ", fg="red") + message, err=True)


def _readable_images(spec: Sequence[str]) -> list[Path]:
    """Every image the spec names that decodes; each bad one (named or found in a folder) is
    reported on one line and left out."""
    from astfad.data.images import scan_images
    from astfad.pipeline import decode

    good = []
    for path, problem in scan_images(list(spec)):
        problem = problem or decode(path, max_pixels=None)[1]
        if problem is None:
            good.append(path)
        else:
            _say_error(f"{problem} (skipped)")
    return good


def _one_line(exc: BaseException) -> str:
    """An error as one line; an OS error names its path (`[Errno 28] ...` becomes
    `No space left on device: 'out/x.png'`)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: '{exc.filename}'"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Group(click.Group):
    """Turn expected user errors into one red line instead of a traceback (exit code 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        from astfad.backbones.weights import WeightsUnavailableError
        from astfad.data.images import ImageLoadError
        from astfad.detector import ModelFileError

        try:
            return super().invoke(ctx)
        except (OSError, ImageLoadError, ModelFileError, WeightsUnavailableError, ValueError) as exc:
            _say_error(_one_line(exc))
            sys.exit(2)


def _writable_ancestor(path: Path) -> None:
    """Refuse, before any work, a path whose nearest existing folder is not a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(parent))


def _check_out_file(out: Path, force: bool) -> None:
    """--out for a model file: not a folder, not an existing file without --force, writable."""
    if out.is_dir():
        raise IsADirectoryError(21, "Is a directory (--out needs a model file path)", str(out))
    if out.exists() and not force:
        raise FileExistsError(f"'{out}' exists; choose another --out or pass --force")
    _writable_ancestor(out)


def _check_out_folder(out: Path) -> None:
    """--out for results: a folder (or a path to create one at), writable."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "Not a directory (--out needs a folder)", str(out))
    _writable_ancestor(out / "x")


_weights_options = [
    click.option("--texture-weights", default=None, metavar="FILE",
                 help="The texture backbone weights the model was fitted with, when not the default "
                      "(a model file never makes astfad read a path or URL it names)."),
    click.option("--semantic-weights", default=None, metavar="FILE",
                 help="The semantic backbone weights the model was fitted with, when not the default."),
]


def _with_weights_options(func):
    for option in reversed(_weights_options):
        func = option(func)
    return func


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="astfad")
def main() -> None:
    """Few-shot industrial visual anomaly detection.

    Fit a detector on a handful of good images, then get a score, a heat map, a verdict and a
    defect mask for every new image. `astfad demo` runs the whole method on built-in data.

    \b
    Exit codes:
      0  done
      1  done, but some inputs or cells failed (each one is named in a row or a line)
      2  stopped: a usage error, a bad input or a filesystem error (one line names it)
    """
    # for this command only: restored when it ends, so a host process (a test's CliRunner) keeps its own
    default_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    click.get_current_context().call_on_close(lambda: setattr(warnings, "formatwarning", default_format))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning reads as one line to the user of the command, not as a source location."""
    return f"warning: {message}\n"


@main.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["auto", "mvtec", "visa", "folder"]), default="auto")
@click.option("--categories", multiple=True, help="Only these categories (repeatable).")
def scan(root: Path, layout: str, categories: tuple[str, ...]) -> None:
    """Count a dataset's images per split and defect type, and list its problems."""
    from astfad.data.datasets import format_scan, scan_dataset

    if not root.is_dir():
        raise NotADirectoryError(20, "Not a directory" if root.exists() else "No such directory", str(root))
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
    click.option("--shots", type=click.IntRange(min=1), default=None,
                 help="Use k >= 1 images sampled from --train (default: all of them)."),
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
@click.option("--keep-candidates", is_flag=True,
              help="Also save the experts the applied strategy does not use (by default only its own, "
                   "which keeps the file small and loads only the backbones it needs).")
def fit(train: tuple[str, ...], shots: int | None, seed: int, sampling: str, settings: tuple[str, ...],
        strategy: str, out: Path, force: bool, pinned: str | None, category: str | None,
        keep_candidates: bool) -> None:
    """Fit a detector on normal images and save it."""
    from astfad.detector import Detector
    from astfad.selection import SelectionReport, load_pinned, pinned_strategy

    config = _parse_settings(settings)
    if pinned is not None:
        if category is None:
            raise click.BadParameter("--pinned needs --category", param_hint="--category")
        strategy = pinned_strategy(category, load_pinned(pinned)) or strategy
        click.echo(f"category '{category}': strategy {strategy} (from {pinned})")
    _check_out_file(out, force)
    paths = _shots(train, shots, seed, sampling)
    click.echo(f"fitting '{strategy}' on {len(paths)} normal image(s)")
    det = Detector(strategy, **{"seed": seed, **config}).fit(paths)
    if det.selection:
        click.echo(SelectionReport.from_dict(det.selection).format())
    det.save(out, overwrite=force, keep_candidates=keep_candidates)
    click.echo(f"strategy {det.strategy} (image score {det.image_score}), image threshold {det.threshold:.4g}, "
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
    if out is not None:
        _check_out_file(out, force=False)
    paths = _shots(train, shots, seed, sampling)
    det = Detector("auto", **{"seed": seed, **config}).fit(paths)
    click.echo(SelectionReport.from_dict(det.selection).format())
    if out is not None:
        det.save(out)
        click.echo(f"saved -> {out}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--zero-shot", is_flag=True,
              help="No model: MODEL and IMAGES are all images, scored in batches (>= 8) against each "
                   "other; thresholds come from each batch (verdict = unusual within its batch).")
@click.option("--batch-evidence", is_flag=True,
              help="Also score each image against the other images of its batch (>= 8, MuSc-style) and "
                   "keep the smaller distance: for batches of parts in which defects are rare. Thresholds "
                   "stay the model's.")
@click.option("--force", is_flag=True,
              help="Start over: first remove what an earlier run wrote in --out (predictions.csv, "
                   "the pictures in overlays/ and masks/).")
@click.option("--resume", is_flag=True,
              help="Continue a cut-off run in --out: images already in its predictions.csv are skipped.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images with more pixels, one row each (default 40 million), or see --downscale.")
@click.option("--downscale", is_flag=True,
              help="Score images over --max-pixels shrunk to fit instead (their overlay and mask are at "
                   "the reduced size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images scored together (a batch also stops at 64 million pixels; two batches of "
                   "decoded images are held at once).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Score on Ray workers (pip install 'astfad[ray]'): on --ray-address, else RAY_ADDRESS, "
                   "else a Ray runtime started here; every node must read MODEL and the images at the same paths.")
@click.option("--ray-address", default=None, metavar="ADDRESS", help="An existing Ray cluster (implies --ray).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray workers (default: one per CPU of the cluster).")
@_with_weights_options
def predict(model: Path, images: tuple[str, ...], out: Path, zero_shot: bool, batch_evidence: bool, force: bool,
            resume: bool, max_pixels: int | None,
            downscale: bool, batch_size: int, use_ray: bool, ray_address: str | None, workers: int | None,
            texture_weights: str | None, semantic_weights: str | None) -> None:
    """Score images: predictions.csv (one row per input, bad ones with their error), heat-map
    overlays (JPEG) and binary masks (PNG) in --out. Rows are written as images finish, so a cut-off run
    loses nothing and continues with --resume. Exits 1 when some inputs could not be scored."""
    from astfad.data.images import DEFAULT_MAX_PIXELS, image_size, scan_images
    from astfad.detector import Detector
    from astfad.pipeline import PredictionItem, PredictionOutputs, iter_predictions, overlay_scale, plan_batches

    if force and resume:
        raise click.UsageError("--force and --resume exclude each other")
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    _check_out_folder(out)
    if (zero_shot or batch_evidence) and (resume or use_ray or ray_address):
        raise click.UsageError("--zero-shot and --batch-evidence score whole batches here: no --resume or --ray")
    if zero_shot:
        det = Detector("semantic")
        _predict_batches(det, det.predict_zero_shot, [str(model), *images], out, force, batch_size, max_pixels)
        return
    if not images:
        raise click.UsageError("give IMAGES to score (or --zero-shot)")
    det = Detector.load(model, texture_weights=texture_weights, semantic_weights=semantic_weights)
    if batch_evidence:
        _predict_batches(det, lambda arrays: det.predict(arrays, len(arrays), batch_evidence=True), list(images),
                         out, force, batch_size, max_pixels)
        return
    entries = scan_images(list(images))
    counts = {"anomalous": 0, "normal": 0, "error": 0}
    with PredictionOutputs(out, overlay_scale(det), resume=resume, force=force, sync_every=batch_size) as outputs:
        if outputs.repaired:
            click.echo(f"repaired a cut-off last row of {outputs.table}")
        for row in outputs.done.values():
            counts[row[2]] = counts.get(row[2], 0) + 1
        if outputs.done:
            click.echo(f"resuming: {len(outputs.done)} image(s) already in {outputs.table}")
        # Batches start where an uninterrupted run's would (scores depend a little on a batch's
        # company), so a resumed run writes exactly the rows an uninterrupted one would.
        good = [path for path, problem in entries if problem is None]
        first = next((i for i, path in enumerate(good) if str(path) not in outputs.done), len(good))
        skip = first if first in (0, len(good)) else \
            max(b.start for b in plan_batches(good, batch_size, max_pixels) if b.start <= first)
        if use_ray or ray_address:
            from astfad.distributed import ray_predictions

            scored = ray_predictions(model, good[skip:], batch_size, workers, ray_address, max_pixels, downscale,
                                     load_options={"texture_weights": texture_weights,
                                                   "semantic_weights": semantic_weights})
        else:
            scored = iter_predictions(det, good[skip:], batch_size, max_pixels, downscale)
        fed = set(good[skip:])
        start, count, downscaled = time.perf_counter(), 0, 0
        try:
            for path, problem in entries:
                if problem is None and path not in fed:
                    continue  # done, before the batch the run restarts with
                item = PredictionItem(path, None, None, problem) if problem else next(scored)
                if str(path) in outputs.done:
                    continue
                if item.error is not None:
                    _say_error(f"{item.error} (skipped)")
                elif downscale and image_size(path) != item.image.shape[:2]:
                    downscaled += 1
                outputs.write(item)
                counts["error" if item.error else "anomalous" if item.prediction.is_anomalous else "normal"] += 1
                count += item.error is None
        finally:
            scored.close()  # stops the decoding thread (or the Ray dataset) it still holds
        seconds = time.perf_counter() - start
    if downscaled:
        click.echo(f"{downscaled} image(s) over {max_pixels / 1e6:g} MP were scored downscaled")
    rate = f", {count / seconds:.2f} images/s" if count and seconds > 0 else ""
    click.echo(f"{sum(counts.values())} input(s): {counts['anomalous']} anomalous, {counts['normal']} normal, "
               f"{counts['error']} failed -> {outputs.table} ({count} scored in {seconds:.1f} s{rate})")
    if counts["error"]:
        sys.exit(1)


def _predict_batches(det, score, specs: list[str], out: Path, force: bool, batch_size: int,
                     max_pixels: int) -> None:
    """`predict --zero-shot` and `--batch-evidence`: batches of at least 8 readable images (a short
    last batch joins the one before), each scored as a whole by `score` (decoded images ->
    Predictions); every unusable input is a row with its error."""
    from astfad.data.images import ImageLoadError, load_image, scan_images
    from astfad.experts.mutual import MIN_BATCH, split_batches
    from astfad.pipeline import PredictionItem, PredictionOutputs, overlay_scale

    entries = scan_images(specs)
    size = max(batch_size, MIN_BATCH)
    batches = split_batches([path for path, problem in entries if problem is None], size)
    failed, scored = 0, 0
    with PredictionOutputs(out, (0.0, 1.0), force=force, sync_every=size) as outputs:
        for path, problem in entries:
            if problem is not None:
                outputs.write(PredictionItem(path, None, None, problem))
                failed += 1
        for batch in batches:
            decoded = []
            for path in batch:
                try:
                    decoded.append((path, load_image(path, max_pixels=max_pixels)))
                except ImageLoadError as exc:
                    outputs.write(PredictionItem(path, None, None, str(exc)))
                    failed += 1
            if len(decoded) < MIN_BATCH:
                for path, _ in decoded:
                    outputs.write(PredictionItem(path, None, None, f"batch scoring needs a batch of at least "
                                                                   f"{MIN_BATCH} readable images"))
                failed += len(decoded)
                continue
            preds = score([image for _, image in decoded])
            outputs.scale = overlay_scale(det)
            for (path, image), pred in zip(decoded, preds):
                outputs.write(PredictionItem(path, image, pred, None))
            scored += len(decoded)
    click.echo(f"{scored} image(s) scored in {len(batches)} batch(es), {failed} failed -> {outputs.table}")
    if failed:
        sys.exit(1)


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
@_with_weights_options
def visualize(model: Path, images: tuple[str, ...], out: Path, masks: Path | None, texture_weights: str | None,
              semantic_weights: str | None) -> None:
    """Comparison panels: image | truth | each saved expert | applied. Exits 1 when some inputs
    could not be drawn."""
    from astfad.data.images import ImageLoadError, load_mask, scan_images
    from astfad.detector import Detector
    from astfad.pipeline import decode, unique_name
    from astfad.visualize import zscore_panel

    _check_out_folder(out)
    det = Detector.load(model, texture_weights=texture_weights, semantic_weights=semantic_weights)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    failed = 0
    for path, problem in scan_images(list(images)):
        image, problem = decode(path) if problem is None else (None, problem)
        try:
            truth_path = _find_truth(path, masks) if image is not None else None
            truth = load_mask(truth_path, image.shape[:2], path) if truth_path else None
        except ImageLoadError as exc:
            problem = str(exc)
        if problem is not None:
            _say_error(f"{problem} (skipped)")
            failed += 1
            continue
        feats, expert_maps = det.maps_of([image], strategy="all")
        applied = det.combine(det.strategy, expert_maps)
        score = float(det.scores(det.strategy, applied, feats.get("texture"))[0])
        maps = det.display_maps({n: m[0] for n, m in expert_maps.items()}, applied[0])
        verdict = "anomalous" if score > det.threshold else "normal"
        name = unique_name(path.stem, used)
        zscore_panel(image, {k: v.numpy() for k, v in maps.items()}, truth,
                     f"{path.name}: score {score:.3g} ({verdict}, threshold {det.threshold:.3g})",
                     out / f"{name}.png")
        click.echo(f"{path} -> {out / (name + '.png')}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--normal", multiple=True,
              help="Good images to calibrate on: a folder, a glob or files (repeatable; at least two).")
@click.option("--unlabelled", multiple=True,
              help="Instead of --normal: unsorted images of which most are good (at least 8); only the "
                   "thresholds are refitted, robustly, so a few defective parts among them move them little.")
@click.option("--fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Target rate of good parts called anomalous (default: the model's).")
@click.option("--pixel-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Target per-pixel false-positive rate of the defect masks (default: the model's).")
@click.option("--threshold", type=float, default=None, help="Set the image threshold by hand instead of --fpr.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The calibrated model file to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out (needed when --out is MODEL).")
@_with_weights_options
def calibrate(model: Path, normal: tuple[str, ...], unlabelled: tuple[str, ...], fpr: float | None,
              pixel_fpr: float | None, threshold: float | None, out: Path, force: bool,
              texture_weights: str | None, semantic_weights: str | None) -> None:
    """Refit a model's normalisers and thresholds on more good images (or its thresholds on
    mostly good unlabelled ones); saves a new model file."""
    import math

    from astfad.detector import Detector

    if bool(normal) == bool(unlabelled):
        raise click.UsageError("give the images to calibrate on with either --normal or --unlabelled")
    if threshold is not None and not math.isfinite(threshold):
        raise click.BadParameter(f"must be a finite number, got {threshold}", param_hint="--threshold")
    _check_out_file(out, force)
    det = Detector.load(model, texture_weights=texture_weights, semantic_weights=semantic_weights)
    images = _readable_images(normal or unlabelled)
    det.calibrate(images, target_fpr=fpr, pixel_target_fpr=pixel_fpr, unlabelled=bool(unlabelled))
    if threshold is not None:
        det.config.threshold = det.threshold = threshold
    det.save(out, overwrite=force, keep_candidates=True)  # keeps every expert MODEL held
    kind = "unlabelled (mostly good)" if unlabelled else "good"
    click.echo(f"calibrated on {len(images)} {kind} image(s), {det.calibration['above_threshold']} of them above "
               f"the calibrated image threshold {det.threshold_for(det.config.target_fpr):.4g}"
               + (f" (image threshold set to {det.threshold:.4g})" if threshold is not None else "")
               + f", pixel threshold {det.pixel_threshold:.4g} -> {out}")


def _run_benchmark(spec, executor=None) -> Path:
    """Run (or resume) a benchmark and write its reports; exit 1 after writing them when some
    cells could not run."""
    from astfad.benchmark import Benchmark, write_reports

    start = time.perf_counter()
    bench = Benchmark(spec, log=click.echo, executor=executor)
    rows = bench.run()
    if not rows:
        raise ValueError(f"no finished cells in '{spec.out}' ({len(bench.failures)} failed); "
                         f"see {spec.out / 'benchmark.log'}")
    paths = write_reports(spec.out, rows, bench.failures)
    click.echo(f"benchmark finished in {time.perf_counter() - start:.0f} s")
    if bench.failures:
        _say_error(f"{len(bench.failures)} cell(s) could not run: see 'Failed cells' in {paths[0]} "
                   "(rerun to retry them)")
        click.echo(f"report: {paths[0]}")
        sys.exit(1)
    return paths[0]


@main.command()
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Dataset root.")
@click.option("--layout", type=click.Choice(["auto", "mvtec", "visa", "folder"]), default="auto")
@click.option("--categories", multiple=True, help="Only these categories (repeatable).")
@click.option("--shots", multiple=True, default=("1", "4"), show_default=True,
              help="Shot counts, e.g. 1,2,4,8 (0: strategy zero_shot alone).")
@click.option("--seeds", multiple=True, default=("0",), show_default=True, help="Seeds, e.g. 0,1,2.")
@click.option("--strategies", multiple=True, default=None,
              help="Strategies to evaluate (repeatable; default: every fixed one and auto; "
                   "'preset' applies --pinned; 'zero_shot' runs at shot count 0 and needs no normal image).")
@click.option("--pinned", default=None, help="Strategy map: a YAML/JSON file or a preset ('paper').")
@click.option("--sampling", type=click.Choice(["random", "slice"]), default="random", show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Detector setting (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Results folder (resumable).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the cells as Ray tasks (pip install 'astfad[ray]'): on --ray-address, else "
                   "RAY_ADDRESS, else a Ray runtime started on this machine.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="An existing Ray cluster, e.g. ray://head:10001 (implies --ray).")
def benchmark(data: Path, layout: str, categories: tuple[str, ...], shots: tuple[str, ...],
              seeds: tuple[str, ...], strategies: tuple[str, ...], pinned: str | None, sampling: str,
              settings: tuple[str, ...], out: Path, use_ray: bool, ray_address: str | None) -> None:
    """Evaluate strategies over categories, shot counts and seeds; rerun to resume.
    Exits 1 when some cells could not run (listed in summary.md)."""
    from astfad.benchmark import FIXED_STRATEGIES, BenchmarkSpec

    spec = BenchmarkSpec(data=data, out=out, layout=layout, categories=_split(categories) or None,
                         shots=_ints(shots, "--shots"), seeds=_ints(seeds, "--seeds"),
                         strategies=_split(strategies) or (*FIXED_STRATEGIES, "auto"),
                         sampling=sampling, pinned=pinned, config=_parse_settings(settings))
    executor = None
    if use_ray or ray_address:
        from astfad.distributed import RayExecutor

        executor = RayExecutor(ray_address)
    summary = _run_benchmark(spec, executor)
    click.echo(f"report: {summary}")


def _split(values: Sequence[str]) -> tuple[str, ...]:
    """Accept both `--shots 1 --shots 4` and `--shots 1,4`."""
    return tuple(x.strip() for v in values or () for x in v.split(",") if x.strip())


def _ints(values: Sequence[str], option: str, minimum: int = 0) -> tuple[int, ...]:
    try:
        numbers = tuple(int(x) for x in _split(values))
    except ValueError:
        raise click.BadParameter(f"expected whole numbers, got {' '.join(values)}", param_hint=option) from None
    if any(n < minimum for n in numbers):
        raise click.BadParameter(f"every value must be at least {minimum}, got {' '.join(values)}", param_hint=option)
    return numbers


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


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="Graph format: ONNX, to run with ONNX Runtime alone.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for detector.onnx and detector.json.")
@click.option("--force", is_flag=True, help="Replace detector.onnx and detector.json in --out.")
@_with_weights_options
def export(model: Path, fmt: str, out: Path, force: bool, texture_weights: str | None,
           semantic_weights: str | None) -> None:
    """Export a fitted detector as one ONNX graph (images in, anomaly map and score out) and a
    JSON of its pre-processing and thresholds."""
    from astfad.detector import Detector
    from astfad.export import export_detector

    _check_out_folder(out)
    det = Detector.load(model, device="cpu", texture_weights=texture_weights, semantic_weights=semantic_weights)
    graph, meta = export_detector(det, out, overwrite=force)
    click.echo(f"wrote {graph} ({graph.stat().st_size / 2**20:.0f} MB) and {meta}")
    if det.config.test_grid != "category":
        from astfad.export import GRID_NOTE

        click.echo(f"note: {GRID_NOTE}")


def _register_service_commands() -> None:
    """`serve` lives in astfad.serve (FastAPI is imported only when it runs)."""
    from astfad.serve.command import serve

    main.add_command(serve)


_register_service_commands()
