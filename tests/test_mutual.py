import numpy as np
import pytest
import torch

from astfad.experts.mutual import mutual_distances


def _batch(n_normal: int, n_defect: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 6, 6, generator=g)
    feats = base + 0.05 * torch.randn(n_normal + n_defect, 16, 6, 6, generator=g)
    labels = np.r_[np.zeros(n_normal), np.ones(n_defect)]
    for i in range(n_normal, n_normal + n_defect):
        feats[i, :, 2, 3] = torch.randn(16, generator=g) * 3  # a defect: one unusual patch
    return feats, labels


def test_defects_outrank_normal_images_even_when_a_few_share_them():
    feats, labels = _batch(10, 3)
    feats[11, :, 2, 3] = feats[10, :, 2, 3]  # two images share the same defect
    scores = mutual_distances(feats).flatten(1).amax(1).numpy()
    assert scores[labels == 1].min() > scores[labels == 0].max()


def test_an_image_is_never_matched_against_itself():
    feats, _ = _batch(8, 0)
    # unlike every other image: only itself could match it (its own generator: drawn from the global
    # one right after a test's torch.manual_seed(0) it was the batch's base pattern, which matches)
    feats[0] = torch.randn(16, 6, 6, generator=torch.Generator().manual_seed(1))
    scores = mutual_distances(feats)
    assert scores[0].mean() > 5 * scores[1:].mean()


def test_small_batches_are_refused():
    with pytest.raises(ValueError, match="at least 8"):
        mutual_distances(torch.randn(4, 16, 3, 3))


def test_zero_shot_batch_ranks_its_pasted_defects_first(fake_backbones):
    from conftest import make_part

    from astfad.detector import Detector
    from astfad.metrics import image_auroc

    rng = np.random.default_rng(3)
    batch = [make_part(rng) for _ in range(10)] + [make_part(rng, defect=True) for _ in range(3)]
    det = Detector("semantic", semantic_size=112, eval_size=112)
    preds = det.predict_zero_shot([image for image, _ in batch])
    labels = [int(mask.any()) for _, mask in batch]
    assert image_auroc(labels, [p.score for p in preds]) == 1.0
    assert sum(p.is_anomalous for p in preds[:10]) <= 1 and all(p.is_anomalous for p in preds[10:])
    assert preds[11].anomaly_map.shape == batch[11][0].shape[:2]
    with pytest.raises(ValueError, match="at least 8"):
        det.predict_zero_shot([image for image, _ in batch[:5]])


def test_predict_command_zero_shot_scores_a_folder(fake_backbones, tmp_path):
    import csv

    from click.testing import CliRunner
    from conftest import make_part
    from PIL import Image

    from astfad.cli import main

    rng = np.random.default_rng(4)
    folder = tmp_path / "batch"
    folder.mkdir()
    for i in range(9):
        Image.fromarray(make_part(rng, defect=i == 4)[0]).save(folder / f"part_{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["predict", "--zero-shot", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output  # the broken file is a failed row; the rest scored
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    assert len(rows) == 10 and rows["broken.png"]["error"]
    scores = {name: float(r["score"]) for name, r in rows.items() if not r["error"]}
    assert max(scores, key=scores.get) == "part_4.png"


def test_each_pair_compared_once_equals_every_image_against_the_others():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(9, 8, 3, 4, generator=g)
    patches = torch.nn.functional.normalize(feats.flatten(2).transpose(1, 2), dim=2)  # (B, 12, 8)
    expected = torch.empty(9, 12)
    for i in range(9):
        per_image = torch.stack([1 - (patches[i] @ patches[j].T).amax(1) for j in range(9) if j != i], 1)
        expected[i] = per_image.clamp_min(0).topk(3, dim=1, largest=False).values.mean(1)  # 30% of 8 -> 3
    assert torch.allclose(mutual_distances(feats).reshape(9, 12), expected, atol=1e-6)


def test_batches_keep_at_least_eight_images():
    from astfad.experts.mutual import split_batches

    assert [len(b) for b in split_batches(range(70), 32)] == [32, 38]  # 6 left over join the last
    assert [len(b) for b in split_batches(range(72), 32)] == [32, 32, 8]
    assert [len(b) for b in split_batches(range(20), 4)] == [8, 12]  # no batch under 8
    assert split_batches(list("abcde"), 32) == [list("abcde")]  # alone: the scorer refuses it by name
    assert sum(split_batches(list(range(50)), 16), []) == list(range(50))


def test_predict_command_batch_evidence_scores_with_a_model(fake_backbones, tmp_path):
    import csv

    from click.testing import CliRunner
    from conftest import make_part
    from PIL import Image

    from astfad.cli import main
    from astfad.detector import Detector

    rng = np.random.default_rng(5)
    model = Detector("semantic", semantic_size=112, eval_size=112).fit([make_part(rng)[0]]).save(tmp_path / "m.safetensors")
    folder = tmp_path / "batch"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(make_part(rng, defect=i == 6)[0]).save(folder / f"part_{i}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(model), str(folder), "--batch-evidence", "--batch-size", "8",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert len(rows) == 10 and not any(r["error"] for r in rows.values())
    scores = {name: float(r["score"]) for name, r in rows.items()}
    assert max(scores, key=scores.get) == "part_6.png"
    plain = CliRunner().invoke(main, ["predict", str(model), str(folder), "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    before = {r["file"].rsplit("/", 1)[-1]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "plain" / "predictions.csv"))}
    assert all(scores[name] <= before[name] + 1e-6 for name in scores)
