"""Ray executors on a local two-CPU cluster started here: the benchmark and batch prediction give
exactly the local rows and scores, and a worker that dies is retried, then reported."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import conftest
from conftest import fake_load_backbone

ray = pytest.importorskip("ray")

from astfad.benchmark import Benchmark, BenchmarkSpec  # noqa: E402
from astfad.cli import main  # noqa: E402
from astfad.data.synthetic import generate_synthetic_dataset  # noqa: E402
from astfad.detector import Detector  # noqa: E402
from astfad.distributed import RayExecutor, ray_predictions  # noqa: E402
from astfad.pipeline import iter_predictions  # noqa: E402
from astfad.report import read_failures, read_results  # noqa: E402

FAST = {"semantic_size": 112, "texture_size": 112, "eval_size": 112, "adapter_steps": 10}
FAULTS = "ASTFAD_TEST_FAULTS"


def _worker_setup() -> None:
    """Runs in every worker of the test cluster: the stand-in backbones, and a switch that makes
    `Detector.fit` kill its worker (`armed` holds "once" or "always"; each kill adds to `fired`)."""
    import astfad.detector

    astfad.detector.load_backbone = fake_load_backbone
    fit = astfad.detector.Detector.fit

    def fit_or_die(self, *args, **kwargs):
        folder = Path(os.environ[FAULTS])
        if (folder / "armed").exists():
            mode = (folder / "armed").read_text()
            if mode == "always" or not (folder / "fired").exists():
                with open(folder / "fired", "a") as handle:
                    handle.write("x")
                os._exit(1)
        return fit(self, *args, **kwargs)

    astfad.detector.Detector.fit = fit_or_die


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A local Ray cluster for this module; yields the fault switch's folder."""
    folder = tmp_path_factory.mktemp("faults")
    here = sys.modules[__name__]
    for module in (conftest, here):  # the workers cannot import tests/: send these by value
        ray.cloudpickle.register_pickle_by_value(module)
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway cluster: no token written to ~/.ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _worker_setup, "env_vars": {FAULTS: str(folder)}})
    try:
        yield folder
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous
        for module in (conftest, here):
            ray.cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture
def armed(faults):
    """Arm the switch: `armed("once")`; disarmed after the test. Returns the `fired` file."""
    def arm(mode: str) -> Path:
        (faults / "armed").write_text(mode)
        return faults / "fired"

    yield arm
    for name in ("armed", "fired"):
        (faults / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("ray") / "data", categories=["brick", "washer"],
                                      n_train=4, n_test_good=2, n_test_per_defect=1, size=112)


def comparable(rows):
    """Rows without the timing columns, NaN as None, by cell."""
    return {(r["category"], r["shots"], r["seed"], r["strategy"]):
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
             if k not in ("fit_seconds", "predict_seconds_per_image")} for r in rows}


def test_benchmark_on_ray_equals_the_local_run(faults, fake_backbones, dataset, tmp_path):
    spec = dict(data=dataset, shots=(1, 2), seeds=(0,), strategies=("texture", "fusion_add", "auto"), config=FAST)
    local = Benchmark(BenchmarkSpec(out=tmp_path / "local", **spec), progress=False).run()
    args = ["benchmark", "--data", str(dataset), "--shots", "1,2", "--seeds", "0", "--strategies",
            "texture,fusion_add,auto", "--out", str(tmp_path / "ray"), "--ray",
            *[x for k, v in FAST.items() for x in ("--set", f"{k}={v}")]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    remote = read_results(tmp_path / "ray" / "results.csv")
    assert len(remote) == 2 * 2 * 3
    assert comparable(remote) == comparable(local)
    for category in ("brick", "washer"):  # the same panels, byte for byte, written by the driver
        manifests = [json.loads((tmp_path / out / "panels" / category / "panels.json").read_text())
                     for out in ("local", "ray")]
        assert manifests[0] == manifests[1] and manifests[0]


def test_a_killed_cell_task_is_retried(faults, armed, fake_backbones, dataset, tmp_path):
    fired = armed("once")
    spec = BenchmarkSpec(data=dataset, out=tmp_path / "out", categories=["washer"], shots=(2,), seeds=(0,),
                         strategies=("texture",), config=FAST)
    bench = Benchmark(spec, progress=False, executor=RayExecutor(max_retries=2))
    rows = bench.run()
    assert fired.read_text() == "x"  # the first attempt died
    assert len(rows) == 1 and not bench.failures and not (tmp_path / "out" / "failed.csv").exists()


def test_a_task_that_always_dies_becomes_a_failed_cell(faults, armed, fake_backbones, dataset, tmp_path):
    fired = armed("always")
    spec = BenchmarkSpec(data=dataset, out=tmp_path / "out", categories=["washer"], shots=(1,), seeds=(0,),
                         strategies=("texture",), config=FAST, panels_per_type=0)
    bench = Benchmark(spec, progress=False, executor=RayExecutor(max_retries=1))
    assert bench.run() == []
    assert fired.read_text() == "xx"  # tried twice
    (failure,) = read_failures(tmp_path / "out" / "failed.csv")
    assert (failure["category"], failure["shots"], failure["seed"]) == ("washer", 1, 0)
    assert "WorkerCrashedError" in failure["reason"] and "tried 2 times" in failure["reason"]
    assert bench.failures == [failure]


def test_ray_predictions_equal_local_predictions(faults, fake_backbones, parts, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, image in enumerate(parts["test"]):
        paths.append(folder / f"part_{i}.png")
        Image.fromarray(image).save(paths[-1])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths[3:3] = [folder / "broken.png", folder / "missing.png"]
    model = Detector("fusion_add", **FAST).fit(parts["train"][:3]).save(tmp_path / "model.safetensors")

    local = list(iter_predictions(Detector.load(model), paths, batch_size=3))
    remote = list(ray_predictions(model, paths, batch_size=3, workers=2))
    assert [item.path for item in remote] == paths  # input order
    assert [item.error is not None for item in remote] == [False] * 3 + [True] * 2 + [False] * 5
    for mine, theirs in zip(local, remote):
        assert theirs.error == mine.error
        if mine.error is None:
            assert theirs.prediction.score == mine.prediction.score
            assert theirs.prediction.is_anomalous == mine.prediction.is_anomalous
            assert np.array_equal(theirs.prediction.anomaly_map, mine.prediction.anomaly_map)
            assert np.array_equal(theirs.prediction.mask, mine.prediction.mask)
            assert np.array_equal(theirs.image, mine.image)


def test_predict_command_on_ray_writes_the_local_rows(faults, fake_backbones, parts, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(parts["test"][:5]):
        Image.fromarray(image).save(folder / f"part_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    model = Detector("texture", **FAST).fit(parts["train"][:3]).save(tmp_path / "model.safetensors")
    tables = []
    for name, extra in (("local", []), ("ray", ["--ray", "--workers", "2"])):
        result = CliRunner().invoke(main, ["predict", str(model), str(folder), "--out", str(tmp_path / name),
                                           "--batch-size", "2", *extra])
        assert result.exit_code == 1, result.output  # the broken image is a failed row, the rest scored
        tables.append((tmp_path / name / "predictions.csv").read_text().replace(f"{tmp_path}/{name}", ""))
    assert tables[0] == tables[1] and tables[0].count("\n") == 7
