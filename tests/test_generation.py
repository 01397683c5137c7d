"""Generation shards (format, resume, corruption, atomicity, batch-size and process-count invariance, filtering) and
the quality report (Fréchet distance against closed forms, class consistency with a known answer, bad input)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trainlib.generation as generation
from datagrad.seeding import derived_seed
from scorenets import ScoreNet, sample, to_uint8_nhwc
from trainlib.checkpoint import save_weights
from trainlib.classifiers import WEIGHTS_METADATA_KEY, build_classifier
from trainlib.generation import GenerateConfig, generate
from trainlib.npz import load_generated, load_npz
from trainlib.quality import (
    QualityConfig,
    class_consistency,
    features_frechet_distance,
    frechet_distance,
    quality_report,
    sqrtm_psd,
)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1, 4, 4)
K = 3


@pytest.fixture(scope="module")
def scorenet_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = ScoreNet.build("tiny8", K, SHAPE, block_out_channels=(8, 16), norm_num_groups=8)
    return net.save_pretrained(tmp_path_factory.mktemp("sn") / "scorenet")


def save_classifier(path, num_classes=K, shape=SHAPE, seed=1):
    torch.manual_seed(seed)
    model = build_classifier("mlp", "gmm-4x4", num_classes, shape)
    info = {"model": "mlp", "dataset": "gmm-4x4", "num_classes": num_classes, "image_shape": list(shape)}
    save_weights(path, model.state_dict(), {WEIGHTS_METADATA_KEY: json.dumps(info)})
    return path


def config(scorenet_dir, out, **overrides) -> GenerateConfig:
    options = dict(scorenet=str(scorenet_dir), out=str(out), num_images=10, shard_size=4, batch_size=3, sampler_steps=2,
                   grid_columns=2)
    return GenerateConfig(**(options | overrides))


def shards(out) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{file name: (images, labels)} as in-memory copies (a memory map of a file rewritten in place would fault)."""
    return {p.name: (np.array(d.parts[0]), d.labels.copy()) for p in sorted(Path(out).glob("shard_*.npz"))
            for d in [load_npz(p)]}


def assert_same_shards(a, b):
    a, b = shards(a), shards(b)
    assert list(a) == list(b) and a
    for name in a:
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], b[name][1]), name


@pytest.fixture(scope="module")
def reference(scorenet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "reference"
    manifest = generate(config(scorenet_dir, out))
    return out, manifest


# -- format and rules --------------------------------------------------------------------------------------------
def test_shards_format_labels_manifest_and_grid(reference, scorenet_dir):
    out, manifest = reference
    found = shards(out)
    assert list(found) == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert [len(found[name][1]) for name in found] == [4, 4, 2]
    labels = np.concatenate([found[name][1] for name in found])
    assert labels.dtype == np.int64 and labels.tolist() == [i % K for i in range(10)]
    for images, _ in found.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (4, 4, 1)
    with np.load(out / "shard_00000.npz") as data:  # plain numpy reads it: the SCORE/DeepMind format
        assert sorted(data.files) == ["image", "label"]
    assert manifest["complete"] and json.loads((out / "generation.json").read_text())["complete"]
    assert manifest["images_per_class"] == [4, 3, 3] and manifest["settings"]["sampler_steps"] == 2
    assert (out / "grid.png").stat().st_size > 0
    assert len(load_generated(out, K)) == 10


def test_image_i_is_sampled_with_its_own_seed(reference, scorenet_dir):
    """Image 5 of the output equals sample(label 5 mod K, seed(0, 5)) drawn alone."""
    out, _ = reference
    net = ScoreNet.from_pretrained(scorenet_dir)
    alone = to_uint8_nhwc(sample(net, [5 % K], [derived_seed(0, 5)], sampler="dpmsolver++", num_steps=2))
    assert np.array_equal(shards(out)["shard_00001.npz"][0][1], alone[0])
    assert derived_seed(0, 5) != derived_seed(0, 6) != derived_seed(1, 5)


def test_identical_across_batch_sizes(reference, scorenet_dir, tmp_path):
    generate(config(scorenet_dir, tmp_path / "b1", batch_size=1))
    generate(config(scorenet_dir, tmp_path / "b10", batch_size=10))
    assert_same_shards(reference[0], tmp_path / "b1")
    assert_same_shards(reference[0], tmp_path / "b10")


def test_identical_across_a_two_process_split(reference, scorenet_dir, tmp_path):
    out = tmp_path / "split"
    assert generate(config(scorenet_dir, out), rank=1, world_size=2) is None  # rank 1 owns shard 1 only
    assert [p.name for p in sorted(out.glob("shard_*.npz"))] == ["shard_00001.npz"]
    manifest = generate(config(scorenet_dir, out), rank=0, world_size=2)  # shards 0 and 2, then the manifest
    assert manifest["complete"]
    assert_same_shards(reference[0], out)


# -- resume, corruption, atomicity ------------------------------------------------------------------------------
def count_sample_calls(monkeypatch, fail_on_call=None):
    calls = []

    def counting_sample(*args, **kwargs):
        calls.append(len(args[1]))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("injected failure")
        return sample(*args, **kwargs)

    monkeypatch.setattr(generation, "sample", counting_sample)
    return calls


def test_existing_complete_shards_are_skipped(reference, scorenet_dir, tmp_path, monkeypatch):
    out = tmp_path / "again"
    generate(config(scorenet_dir, out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npz")}
    calls = count_sample_calls(monkeypatch)
    assert generate(config(scorenet_dir, out, batch_size=5))["complete"]  # batch size may change on resume
    assert calls == [] and stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npz")}


@pytest.mark.parametrize("damage", ["truncate", "wrong-labels"])
def test_a_corrupt_shard_is_regenerated_with_a_warning(reference, scorenet_dir, tmp_path, monkeypatch, damage):
    out = tmp_path / "damaged"
    generate(config(scorenet_dir, out))
    victim = out / "shard_00001.npz"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        images, labels = shards(out)["shard_00001.npz"]
        np.savez(victim, image=images, label=(labels + 1) % K)
    calls = count_sample_calls(monkeypatch)
    with pytest.warns(UserWarning, match="regenerating .*shard_00001.npz"):
        generate(config(scorenet_dir, out))
    assert sum(calls) == 4  # only shard 1 was drawn again
    assert_same_shards(reference[0], out)


def test_an_interrupted_run_leaves_no_partial_shard_and_resumes(reference, scorenet_dir, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    count_sample_calls(monkeypatch, fail_on_call=3)  # batches of 3: calls 1-2 make shard 0, call 3 is in shard 1
    with pytest.raises(RuntimeError, match="injected failure"):
        generate(config(scorenet_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "shard_00000.npz"]  # no temporaries
    assert not json.loads((out / "generation.json").read_text())["complete"]
    monkeypatch.setattr(generation, "sample", sample)
    (out / "shard_00001.npz.tmp-4242").write_bytes(b"left by a crashed writer")
    assert generate(config(scorenet_dir, out))["complete"]
    assert not list(out.glob("*.tmp-*"))
    assert_same_shards(reference[0], out)


def test_other_settings_in_the_same_directory_are_refused(reference, scorenet_dir, tmp_path):
    out = tmp_path / "mixed"
    generate(config(scorenet_dir, out))
    before = shards(out)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):
        generate(config(scorenet_dir, out, seed=1))
    assert all(np.array_equal(before[n][0], shards(out)[n][0]) for n in before)


# -- filtering ------------------------------------------------------------------------------------------------
def test_filtering_keeps_the_most_confident_candidates_per_class(scorenet_dir, tmp_path):
    from trainlib.classifiers import load_classifier

    classifier_path = save_classifier(tmp_path / "clf.safetensors")
    cfg = config(scorenet_dir, tmp_path / "filtered", num_images=6, shard_size=6,
                 filter_classifier=str(classifier_path), keep_fraction=0.5)
    generate(cfg)
    images, labels = shards(cfg.out)["shard_00000.npz"]
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    # Independent recomputation: 4 candidates per class (2 kept of each), seeds (seed, 1, shard, class, j).
    net, classifier = ScoreNet.from_pretrained(scorenet_dir), load_classifier(classifier_path).model
    for c in range(K):
        seeds = [derived_seed(0, 1, 0, c, j) for j in range(4)]
        candidates = to_uint8_nhwc(sample(net, [c] * 4, seeds, sampler="dpmsolver++", num_steps=2))
        x = torch.from_numpy(candidates).permute(0, 3, 1, 2).float() / 255
        confidence = classifier(x).softmax(dim=1)[:, c]
        best = sorted(confidence.argsort(descending=True)[:2].tolist())
        assert np.array_equal(images[labels == c], candidates[best])
    same = config(scorenet_dir, tmp_path / "filtered-b1", num_images=6, shard_size=6,
                  filter_classifier=str(classifier_path), keep_fraction=0.5, batch_size=1)
    generate(same)
    assert_same_shards(cfg.out, same.out)


@pytest.mark.slow  # a subprocess that samples
def test_script_entry_point_writes_shards(scorenet_dir, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train" / "generate.py"), "--scorenet", str(scorenet_dir), "--out", str(out),
         "--num-images", "3", "--sampler-steps", "1", "--grid-columns", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert load_npz(out / "shard_00000.npz").labels.tolist() == [0, 1, 2]


# -- quality report ---------------------------------------------------------------------------------------------
def random_spd(dim, seed):
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    # Diagonal covariances: FD = ||μ₁ − μ₂||² + Σ (sqrt(a_i) − sqrt(b_i))².
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-12)
    # General covariances: tr (Σ₁^½ Σ₂ Σ₁^½)^½ = Σ sqrt(eigenvalues of the non-symmetric Σ₁Σ₂).
    c1, c2 = random_spd(6, 1), random_spd(6, 2)
    cross = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    expected = np.trace(c1) + np.trace(c2) - 2 * cross
    assert frechet_distance(np.zeros(6), c1, np.zeros(6), c2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, c1[:5, :5], mu1, c1[:5, :5]) == pytest.approx(0, abs=1e-9)
    root = sqrtm_psd(c1)
    np.testing.assert_allclose(root @ root, c1, rtol=1e-10, atol=1e-10)


def test_frechet_distance_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(20000, 3)) * [1.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    expected = 1.0 + (2.0 - 1.0) ** 2  # mean shift 1, std 2 vs 1 on the second axis
    assert features_frechet_distance(a, b) == pytest.approx(expected, abs=0.06)
    with pytest.raises(ValueError, match="mismatched shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class FirstPixelClassifier(nn.Module):
    """Predicts class round(K · x[0, 0, 0]) (a classifier whose answers are known in advance)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return -(x[:, 0, 0, 0, None] * K - torch.arange(K)).abs()


def test_class_consistency_known_answer():
    labels = np.array([0, 1, 2] * 10)
    intended = labels.copy()
    intended[:9] = (intended[:9] + 1) % K  # 9 of 30 images do not show their intended class
    x = torch.zeros(30, 1, 4, 4)
    x[:, 0, 0, 0] = torch.from_numpy(labels / K).float()
    predictions = FirstPixelClassifier()(x).argmax(dim=1).numpy()
    overall, per_class = class_consistency(predictions, intended, K)
    assert overall == pytest.approx(21 / 30)
    assert per_class == pytest.approx([0.7, 0.7, 0.7])
    assert math.isnan(class_consistency(predictions[:2], intended[:2], K)[1][0])  # intended [1, 2]: no class 0


def write_generated(path, image, label):
    np.savez(path, image=image, label=label)
    return path


@pytest.mark.slow  # trains a classifier, then scores real images as generated ones
def test_quality_report_end_to_end(tmp_path):
    """Real gmm-4x4 test images as "generated" data: consistency ≈ the real test accuracy, FD ≈ the floor."""
    from trainlib.datasets import load_dataset

    test = load_dataset("gmm-4x4", "test")
    x, y = test.tensors()
    generated = write_generated(tmp_path / "gen.npz", to_uint8_nhwc(x.clamp(0, 1)), y.numpy())
    cfg = QualityConfig(generated=str(generated), dataset="gmm-4x4", model="mlp", epochs=1, out=str(tmp_path / "q"))
    report = quality_report(cfg)
    assert report["classifier_real_test_accuracy"] > 0.9
    assert report["class_consistency"] == pytest.approx(report["classifier_real_test_accuracy"], abs=0.02)
    assert report["frechet_distance"] < 2 * report["frechet_distance_real_train_vs_test"] + 1e-3
    assert (tmp_path / "q" / "classifier.safetensors").is_file()
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["n_generated"] == len(y)
    stamp = (tmp_path / "q" / "classifier.safetensors").stat().st_mtime_ns
    quality_report(cfg)  # the cached classifier is reused
    assert (tmp_path / "q" / "classifier.safetensors").stat().st_mtime_ns == stamp
