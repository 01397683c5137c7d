"""Classifiers as the project builds, saves and loads them, in one place.

* ``build_classifier(name, dataset, K, shape)``: a ``trainlib.models`` network with the dataset's normalisation;
* weights are safetensors files whose metadata (key ``WEIGHTS_METADATA_KEY``) holds JSON with the model name,
  dataset, class count, image shape, threat model and objective: enough to rebuild the model without the run;
* per-epoch snapshots ``<run>/snapshots/epoch_NNNN.safetensors`` (``snapshot_path``, ``list_snapshots``);
* ``load_classifier(path)``: the one loader every command uses. ``path`` is a run directory (its final
  ``ema.safetensors`` / ``model.safetensors``, or ``best/`` with ``which="best"``), a step checkpoint folder (verified
  against its manifest; the EMA state or the raw weights) or a weights file. The settings come from the weights'
  metadata and the run's config.json; the class count and image shape, where neither records them, from the
  dataset's test split.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .checkpoint import load_pickle_safely, load_weights, load_weights_metadata, verify_checkpoint
from .files import sha256_file
from .models import DATASET_STATS, build_model

WEIGHTS_METADATA_KEY = "trainlib"
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_PATTERN = re.compile(r"epoch_(\d{4,})\.safetensors")


def build_classifier(name: str, dataset: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """``models.build_model`` with the dataset's normalisation (CIFAR-100 statistics for cifar100)."""
    mean, std = DATASET_STATS.get(dataset, (None, None))
    return build_model(name, num_classes, in_channels=image_shape[0], image_size=image_shape[1:], mean=mean, std=std)


def weights_metadata(cfg, num_classes: int, image_shape: tuple[int, ...], **extra) -> dict:
    """String metadata for a safetensors file: the model, dataset, class count, image shape, norm, ε and objective of
    ``cfg`` (a training config) and ``extra``."""
    info = dict(model=cfg.model, dataset=cfg.dataset, num_classes=num_classes, image_shape=list(image_shape),
                norm=cfg.norm, eps=cfg.eps, objective=cfg.objective, **extra)
    return {WEIGHTS_METADATA_KEY: json.dumps(info)}


def snapshot_path(run_dir: str | Path, epoch: int) -> Path:
    """``<run>/snapshots/epoch_NNNN.safetensors``: the EMA weights after ``epoch`` completed epochs."""
    return Path(run_dir) / SNAPSHOTS_DIR / f"epoch_{epoch:04d}.safetensors"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every per-epoch snapshot of a run, in epoch order (temporary files never match)."""
    directory = Path(run_dir) / SNAPSHOTS_DIR
    found = [(int(m.group(1)), p) for p in directory.glob("epoch_*.safetensors")
             if (m := SNAPSHOT_PATTERN.fullmatch(p.name))]
    return sorted(found)


def run_config(run_dir: Path) -> dict:
    """The resolved training options of a run directory (its config.json), {} when there is none."""
    path = run_dir / "config.json"
    return json.loads(path.read_text()).get("config", {}) if path.is_file() else {}


@dataclass
class LoadedClassifier:
    """A classifier in eval mode on the CPU, its settings (model, dataset, num_classes, image_shape, norm, eps,
    objective, ...), the file its weights came from (``sha256``: its digest) and where an evaluation writes by
    default."""

    model: nn.Module
    settings: dict
    weights: Path
    sha256: str
    default_out: Path


def _locate(source: Path, which: str, weights: str) -> tuple[Path, dict, Path, bool]:
    """(weights file, settings known so far, default output directory, whether the file is a pickled EMA state)."""
    if not source.exists():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if source.is_file():
        metadata = load_weights_metadata(source).get(WEIGHTS_METADATA_KEY, "{}")
        return source, json.loads(metadata), source.parent / f"eval-{source.stem}", False
    if (source / "meta.json").is_file():  # a step checkpoint folder: raw weights or the registered EMA state
        problem = verify_checkpoint(source)
        if problem is not None:
            raise ValueError(f"cannot evaluate checkpoint {source}: {problem}")
        settings = run_config(source.parent.parent)
        if weights == "model":
            return source / "model.safetensors", settings, source / "eval", False
        return source / "custom_checkpoint_0.pkl", settings, source / "eval", True
    settings = run_config(source)
    if not settings:
        raise ValueError(f"{source} is neither a run directory (config.json), a checkpoint folder nor a weights file")
    directory = source / "best" if which == "best" else source
    name = "ema.safetensors" if which == "best" or weights == "ema" else "model.safetensors"
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory / name} not found (has the run finished? try --which best or a "
                                "checkpoint folder)")
    file_settings = json.loads(load_weights_metadata(directory / name).get(WEIGHTS_METADATA_KEY, "{}"))
    return directory / name, settings | file_settings, source / "eval", False


def load_classifier(path: str | os.PathLike, *, which: str = "final", weights: str = "ema", model: str | None = None,
                    dataset: str | None = None, data_dir: str = "data") -> LoadedClassifier:
    """Load a classifier from a run directory, a step checkpoint folder or a weights file (module docstring).

    ``which``: "final" or "best" (run directories); ``weights``: "ema" or "model" (the raw weights); ``model`` /
    ``dataset`` override what the run recorded. Raises FileNotFoundError / ValueError with a clear message when the
    path, its metadata or the weights do not fit.
    """
    source = Path(path)
    file, settings, default_out, pickled = _locate(source, which, weights)
    state = load_pickle_safely(file)["model"] if pickled else load_weights(file)
    model_name, dataset = model or settings.get("model"), dataset or settings.get("dataset")
    if model_name is None or dataset is None:
        raise ValueError(f"cannot tell the model or dataset of {source}; pass them (--model, --dataset)")
    num_classes, image_shape = settings.get("num_classes"), settings.get("image_shape")
    if num_classes is None or image_shape is None or dataset != settings.get("dataset"):
        from .datasets import load_dataset

        test = load_dataset(dataset, "test", data_dir)
        num_classes, image_shape = test.num_classes, test.image_shape
    network = build_classifier(model_name, dataset, int(num_classes), tuple(image_shape))
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"weights of {source} do not fit model {model_name!r} on {dataset}: {first}") from None
    settings = settings | dict(model=model_name, dataset=dataset, num_classes=int(num_classes),
                               image_shape=list(image_shape))
    return LoadedClassifier(network.eval(), settings, file, sha256_file(file), default_out)
