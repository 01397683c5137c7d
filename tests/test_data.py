"""Datasets, npz validation, memory-mapped shards, the resumable mixing sampler and batched augmentation."""

import itertools
import os
import pickle

import numpy as np
import pytest
import torch

from datagrad import toy_mixture
from trainlib.augment import crop_flip, random_crop_flip, random_crop_flip_params
from trainlib.datasets import ImageDataset, load_dataset
from trainlib.files import atomic_save_npz
from trainlib.npz import load_generated, load_npz, read_npz
from trainlib.sampling import BatchLoader, MixedBatchSampler, ordered_batches


# -- named datasets --------------------------------------------------------------------------------------------
def test_digits_has_1797_images_in_fixed_splits():
    splits = {s: load_dataset("digits", s) for s in ("train", "val", "test", "trainval")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 1257, "val": 180, "test": 360, "trainval": 1437}
    x, y = splits["trainval"].tensors()
    x_test, _ = splits["test"].tensors()
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1 and set(y.tolist()) == set(range(10))
    train_x, _ = splits["train"].tensors()
    assert torch.equal(torch.cat([splits["val"].tensors()[0], train_x]), x)  # trainval = val + train
    from sklearn.datasets import load_digits

    everything = torch.from_numpy(load_digits().images / 16).float().flatten(1)
    found = torch.cat([x, x_test]).flatten(1)  # every original image appears, each split drawn from them
    assert torch.cdist(found, everything).min(dim=1).values.max() == 0
    assert torch.cdist(everything, found).min(dim=1).values.max() == 0
    assert load_dataset("digits", "test").tensors()[0].equal(x_test)  # deterministic


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid names: digits, cifar10, cifar100, gmm-8x8"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_dataset("digits", "dev")


def _write_cifar_fixture(root, name, images_per_file):
    """Fake CIFAR files in torchvision's on-disk format (pickled dicts of uint8 rows [n, 3·32·32])."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, label_key, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels", (
            "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        files.append("test_batch")
    else:
        folder, files, label_key = "cifar-100-python", ["train", "test"], "fine_labels"
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    os.makedirs(root / folder)
    written = {}
    for file in files:
        n = images_per_file * (5 if name == "cifar100" and file == "train" else 1)
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10 if name == "cifar10" else 100, n).tolist()
        with open(root / folder / file, "wb") as f:
            pickle.dump({"data": rows, label_key: labels}, f)
        written[file] = (rows, labels)
    with open(root / folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_torchvision_files(tmp_path, monkeypatch, name):
    """Real torchvision loading of fake files. torchvision checks every file's md5 (and would download on a
    mismatch), so the test replaces only that check with an existence check; nothing touches the network."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    written = _write_cifar_fixture(tmp_path, name, images_per_file=220)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    rows = np.concatenate([written[f][0] for f in train_files])  # [1100, 3072] channel-major rows
    labels = [label for f in train_files for label in written[f][1]]
    train, val = load_dataset(name, "train", tmp_path), load_dataset(name, "val", tmp_path)
    assert (len(train), len(val), len(load_dataset(name, "trainval", tmp_path))) == (1100 - 1024, 1024, 1100)
    assert train.num_classes == (10 if name == "cifar10" else 100)
    x, y = val.get([0, 1023])
    expected = torch.from_numpy(rows[[0, 1023]].reshape(2, 3, 32, 32)).float() / 255
    assert torch.equal(x, expected) and y.tolist() == [labels[0], labels[1023]]
    x, y = train.get([0])
    assert torch.equal(x[0], torch.from_numpy(rows[1024].reshape(3, 32, 32)).float() / 255) and y[0] == labels[1024]
    test_x, _ = load_dataset(name, "test", tmp_path).tensors()
    test_file = "test_batch" if name == "cifar10" else "test"
    assert torch.equal(test_x, torch.from_numpy(written[test_file][0].reshape(-1, 3, 32, 32)).float() / 255)


def test_gaussian_mixture_toys_expose_the_exact_mixture():
    mixture = toy_mixture("gmm-8x8")
    means = mixture.means  # [10, 64]: 0.5 + 0.1·(±1 Hadamard rows)
    patterns = (means - 0.5) / 0.1
    assert torch.allclose(patterns.abs(), torch.ones_like(patterns))
    assert torch.allclose(patterns @ patterns.T, 64 * torch.eye(10, dtype=torch.float64))  # orthogonal
    assert mixture.event_shape == (1, 8, 8) and mixture.num_classes == 10
    train, test = load_dataset("gmm-8x8", "train"), load_dataset("gmm-8x8", "test")
    assert (len(train), len(test), train.image_shape, train.num_classes) == (10_000, 2_000, (1, 8, 8), 10)
    assert train.mixture is not None
    x, y = test.tensors()
    assert abs(x.mean().item() - 0.5) < 0.01 and abs(x.std().item() - (0.1**2 + 0.15**2) ** 0.5) < 0.01
    accuracy = (mixture.log_posterior(x.double()).argmax(1) == y).double().mean()
    assert accuracy > 0.99  # the labels are the mixture components the images were drawn from
    assert torch.equal(load_dataset("gmm-4x4", "test").tensors()[0], load_dataset("gmm-4x4", "test").tensors()[0])


def test_train_samples_draw_a_larger_train_split_of_the_same_distribution():
    """--train-samples N (estimators studied at more data): N train samples of the same mixture, the other splits
    unchanged; refused where the distribution is unknown."""
    large = load_dataset("gmm-8x8", "train", train_samples=40_000)
    assert len(large) == 40_000 and large.mixture is not None
    x, y = large.tensors()
    labels = torch.bincount(y, minlength=10).double() / len(y)
    assert torch.all((labels - 0.1).abs() < 0.01)  # uniform priors
    assert abs(x.std().item() - (0.1**2 + 0.15**2) ** 0.5) < 0.005
    assert not torch.equal(x[:10_000], load_dataset("gmm-8x8", "train").tensors()[0])
    assert torch.equal(load_dataset("gmm-8x8", "test", train_samples=40_000).tensors()[0],
                       load_dataset("gmm-8x8", "test").tensors()[0])
    with pytest.raises(ValueError, match="--train-samples draws from a known distribution"):
        load_dataset("digits", "train", train_samples=100)


# -- npz files ---------------------------------------------------------------------------------------------------
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


GOOD_IMAGE = np.zeros((4, 2, 2, 3), np.uint8)
GOOD_LABEL = np.array([0, 1, 2, 1])


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        ({"image": GOOD_IMAGE}, ValueError, r"missing key\(s\) \['label'\]; found \['image'\]"),
        ({"images": GOOD_IMAGE, "labels": GOOD_LABEL}, ValueError, r"missing key\(s\) \['image', 'label'\]"),
        ({"image": GOOD_IMAGE.astype(np.int64), "label": GOOD_LABEL}, ValueError, "must be uint8 .* got int64"),
        ({"image": GOOD_IMAGE.astype(np.float64), "label": GOOD_LABEL}, ValueError, "got float64"),
        ({"image": GOOD_IMAGE[..., 0], "label": GOOD_LABEL}, ValueError, r"shape \(N, H, W, C\), got \(4, 2, 2\)"),
        ({"image": GOOD_IMAGE[:0], "label": GOOD_LABEL[:0]}, ValueError, "no images"),
        ({"image": GOOD_IMAGE, "label": GOOD_LABEL.astype(np.float32)}, ValueError, "'label' must hold integers"),
        ({"image": GOOD_IMAGE, "label": GOOD_LABEL[:, None]}, ValueError, r"'label' must have shape \(N,\)"),
        ({"image": GOOD_IMAGE, "label": GOOD_LABEL[:3]}, ValueError, "3 labels for 4 images"),
        ({"image": GOOD_IMAGE, "label": np.array([0, -1, 2, 1])}, ValueError, "negative label -1"),
        ({"image": GOOD_IMAGE, "label": np.array([0, 1, 2, 3])}, ValueError, "label 3 out of range for 3 classes"),
        ({"image": np.full((4, 2, 2, 3), 1.5, np.float32), "label": GOOD_LABEL}, ValueError, r"\[0, 1\]"),
        ({"image": np.full((4, 2, 2, 3), -0.1, np.float32), "label": GOOD_LABEL}, ValueError, r"\[0, 1\]"),
        ({"image": np.full((4, 2, 2, 3), np.nan, np.float32), "label": GOOD_LABEL}, ValueError, "NaN"),
        ({"image": np.array([None] * 4, object), "label": GOOD_LABEL}, ValueError, "Python objects"),
    ],
)
def test_npz_validation_errors(tmp_path, arrays, error, message):
    path = _npz(tmp_path / "data.npz", **arrays)
    with pytest.raises(error, match=message):
        load_npz(path, num_classes=3)


def test_npz_missing_not_a_zip_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"not a valid \.npz file"):
        load_npz(tmp_path / "text.npz")
    path = _npz(tmp_path / "full.npz", image=np.zeros((50, 8, 8, 3), np.uint8), label=np.zeros(50, np.int64))
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"not a valid \.npz file"):
        load_npz(tmp_path / "cut.npz")


def test_npz_dataset_values_classes_and_split_template(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 3), dtype=np.uint8)
    _npz(tmp_path / "set_train.npz", image=image, label=np.array([0, 4, 1, 1, 2], np.int32))
    _npz(tmp_path / "set_test.npz", image=image[:2], label=np.array([3, 0]))
    data = load_dataset(f"npz:{tmp_path}/set_{{split}}.npz", "train")
    assert data.num_classes == 5 and data.image_shape == (3, 3, 4)
    x, y = data.get([4, 1])
    assert torch.equal(x, torch.from_numpy(image[[4, 1]]).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == [2, 4] and y.dtype == torch.int64
    assert len(load_dataset(f"npz:{tmp_path}/set_{{split}}.npz", "test", num_classes=10)) == 2
    assert len(load_dataset(f"npz:{tmp_path}/set_train.npz", "train")) == 5
    with pytest.raises(ValueError, match="has no 'test' split; put '\\{split\\}' in the path"):
        load_dataset(f"npz:{tmp_path}/set_train.npz", "test")
    float_image = np.linspace(0, 1, 2 * 2 * 2 * 1, dtype=np.float32).reshape(2, 2, 2, 1)
    x, _ = load_npz(_npz(tmp_path / "float.npz", image=float_image, label=np.array([0, 1]))).tensors()
    assert torch.equal(x, torch.from_numpy(float_image).permute(0, 3, 1, 2))


# -- memory-mapped shards -----------------------------------------------------------------------------------------
def test_shard_members_are_memory_mapped_and_identical_to_np_load(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 64).astype(np.int64),
        "fortran": np.asfortranarray(rng.normal(size=(7, 5)).astype(np.float32)),
    }
    atomic_save_npz(tmp_path / "shard.npz", **arrays)
    mapped = read_npz(tmp_path / "shard.npz")
    with np.load(tmp_path / "shard.npz") as reference:
        for key in arrays:
            assert isinstance(mapped[key], np.memmap)  # not read into memory
            assert mapped[key].dtype == reference[key].dtype and mapped[key].shape == reference[key].shape
            np.testing.assert_array_equal(mapped[key], reference[key])
    assert mapped["fortran"].flags.f_contiguous
    assert mapped["image"].offset + mapped["image"].nbytes <= (tmp_path / "shard.npz").stat().st_size


def test_compressed_members_load_with_a_warning(tmp_path):
    image = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez_compressed(tmp_path / "small.npz", image=image, label=np.array([1, 0]))
    with pytest.warns(UserWarning, match="compressed and is loaded into memory"):
        data = load_npz(tmp_path / "small.npz")
    assert not isinstance(data.parts[0], np.memmap)
    np.testing.assert_array_equal(data.parts[0], image)


def test_generated_shards_concatenate_across_files(tmp_path):
    rng = np.random.default_rng(1)
    shards = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (5, 7)]
    labels = [rng.integers(0, 10, len(s)) for s in shards]
    for i, (image, label) in enumerate(zip(shards, labels, strict=True)):
        atomic_save_npz(tmp_path / f"shard_{i:05d}.npz", image=image, label=label)
    (tmp_path / "shard_00002.npz.tmp-99").write_bytes(b"half-written")  # never picked up
    data = load_generated(tmp_path, num_classes=10)
    assert len(data) == 12 and all(isinstance(p, np.memmap) for p in data.parts)
    order = [11, 0, 6, 4, 5]
    x, y = data.get(order)
    everything, all_labels = np.concatenate(shards), np.concatenate(labels)
    assert torch.equal(x, torch.from_numpy(everything[order]).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == all_labels[order].tolist()
    assert len(load_generated(f"{tmp_path}/shard_*.npz", num_classes=10)) == 12
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        load_generated(tmp_path, num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"no \.npz shards"):
        load_generated(f"{tmp_path}/none_*.npz", num_classes=10)


# -- sampling ------------------------------------------------------------------------------------------------------
def test_batches_mix_real_and_generated_in_the_paper_proportion():
    sampler = MixedBatchSampler(50, 100, num_generated=1000, unsup_fraction=0.7, epoch_size=1000, seed=0)
    assert (len(sampler), sampler.generated_per_batch, sampler.real_per_batch) == (10, 70, 30)
    batches = [sampler.global_batch(0, b) for b in range(5)]
    assert all((b >= 50).sum() == 70 and len(b) == 100 for b in batches)
    is_generated = np.stack(batches) >= 50  # shuffled together, so every rank's slice holds both kinds
    assert 0.5 < is_generated[:, :50].mean() < 0.9 and 0.5 < is_generated[:, 50:].mean() < 0.9
    real_draws = np.concatenate([b[b < 50] for b in batches])  # 5 · 30 = 150 draws = 3 sweeps of 50
    assert np.array_equal(np.sort(real_draws), np.repeat(np.arange(50), 3))  # each real image once per sweep
    generated = np.concatenate([b[b >= 50] for b in batches]) - 50
    assert generated.max() < 1000 and len(np.unique(generated)) < len(generated)  # with replacement
    with pytest.raises(ValueError, match="needs generated data"):
        MixedBatchSampler(50, 100, unsup_fraction=0.7)
    with pytest.raises(ValueError, match="divisible by 3"):
        MixedBatchSampler(50, 100, world_size=3)


def test_sampler_is_a_pure_function_of_seed_epoch_batch():
    def make(seed):
        return MixedBatchSampler(40, 16, num_generated=30, unsup_fraction=0.5, epoch_size=100, seed=seed)

    first, second = make(0), make(0)
    all_batches = list(itertools.product(range(3), range(len(first))))
    for epoch, batch in reversed(all_batches):  # order of requests does not matter
        assert np.array_equal(first.global_batch(epoch, batch), second.global_batch(epoch, batch))
    assert not np.array_equal(make(1).global_batch(0, 0), first.global_batch(0, 0))
    assert not np.array_equal(first.global_batch(1, 0), first.global_batch(0, 0))


def _loaders(world_size, **kwargs):
    real = load_dataset("digits", "train")
    rng = np.random.default_rng(0)
    generated = ImageDataset([rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)], rng.integers(0, 10, 300), 10)
    return [
        BatchLoader(real, 64, generated=generated, unsup_fraction=0.7, epoch_size=320, seed=5,
                    world_size=world_size, rank=rank, augment=True, **kwargs)
        for rank in range(world_size)
    ]


def test_mid_epoch_resume_equals_continuing():
    (loader,) = _loaders(1)
    uninterrupted = list(loader.epoch(1))
    (fresh,) = _loaders(1)  # a new process resuming at batch 2 of epoch 1
    resumed = list(fresh.epoch(1, start_batch=2))
    assert len(uninterrupted) == 5 and len(resumed) == 3
    for (x, y), (x_resumed, y_resumed) in zip(uninterrupted[2:], resumed, strict=True):
        assert torch.equal(x, x_resumed) and torch.equal(y, y_resumed)


def test_ranks_take_disjoint_slices_that_rebuild_the_single_process_batch():
    (single,) = _loaders(1)
    ranks = _loaders(2)
    samplers = [r.sampler for r in ranks]
    indices = [s.batch_indices(0, 3) for s in samplers]
    assert np.array_equal(np.concatenate(indices), single.sampler.global_batch(0, 3))
    x, y = single.batch(0, 3)
    parts = [r.batch(0, 3) for r in ranks]
    assert parts[0][0].shape == (32, 1, 8, 8)
    assert torch.equal(torch.cat([p[0] for p in parts]), x)  # augmentation included: same crops and flips
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_ordered_batches_cover_the_first_n_in_order():
    data = load_dataset("digits", "test")
    batches = list(ordered_batches(data, 64, limit=150))
    assert [len(y) for _, y in batches] == [64, 64, 22]
    x_all, y_all = data.tensors()
    assert torch.equal(torch.cat([x for x, _ in batches]), x_all[:150])
    assert torch.equal(torch.cat([y for _, y in batches]), y_all[:150])


# -- augmentation -------------------------------------------------------------------------------------------------
def test_crop_and_flip_on_a_hand_made_image():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]

    def one(top, left, flip):
        return crop_flip(x, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]), padding=1)[0, 0]

    assert torch.equal(one(1, 1, False), x[0, 0])  # centre crop = identity
    assert torch.equal(one(1, 1, True), torch.tensor([[3.0, 2, 1], [6, 5, 4], [9, 8, 7]]))
    assert torch.equal(one(0, 0, False), torch.tensor([[0.0, 0, 0], [0, 1, 2], [0, 4, 5]]))  # shifted down-right
    assert torch.equal(one(2, 1, False), torch.tensor([[4.0, 5, 6], [7, 8, 9], [0, 0, 0]]))  # shifted up
    assert torch.equal(one(1, 2, True), torch.tensor([[0.0, 3, 2], [0, 6, 5], [0, 9, 8]]))  # left shift, mirrored


def test_random_crop_flip_outputs_are_valid_crops():
    x = torch.rand(16, 3, 6, 6)
    generator = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, generator=generator)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image, result in zip(padded, out, strict=True):  # brute force over all 5·5·2 candidates
        candidates = [image[:, t : t + 6, s : s + 6] for t in range(5) for s in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(result, c) for c in candidates)
    assert not torch.equal(out, x)


def test_augmented_batches_of_stored_pixels_equal_the_float_path(tmp_path):
    """BatchLoader crops/flips the stored (uint8) pixels before the float conversion: bit-identical to converting
    first (``get``) and augmenting the float batch, also for a float32 real set mixed with uint8 generated shards."""
    rng = np.random.default_rng(3)
    shard = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    atomic_save_npz(tmp_path / "shard_00000.npz", image=shard, label=rng.integers(0, 10, 40))
    generated = load_generated(tmp_path, num_classes=10)
    for pixels in (rng.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8), rng.random((30, 6, 6, 3), dtype=np.float32)):
        real = ImageDataset([pixels], rng.integers(0, 10, 30), 10)
        as_float = lambda a: a.astype(np.float32) / np.float32(255) if a.dtype == np.uint8 else a
        everything = torch.from_numpy(np.concatenate([as_float(pixels), as_float(shard)])).permute(0, 3, 1, 2)
        loader = BatchLoader(real, 16, generated=generated, unsup_fraction=0.5, epoch_size=48, seed=1, augment=True,
                             padding=2, world_size=2, rank=1)
        for batch in range(len(loader)):
            x, y = loader.batch(0, batch)
            reference, labels = loader.dataset.get(loader.sampler.batch_indices(0, batch))
            params = random_crop_flip_params(16, 2, loader.sampler.augment_generator(0, batch))
            top, left, flip = (p[8:] for p in params)  # rank 1 of 2: the second half of the global batch
            assert torch.equal(reference, everything[loader.sampler.batch_indices(0, batch)])
            assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(y, labels)
            assert torch.equal(x, crop_flip(reference, top, left, flip, padding=2))
