"""trainlib: the shared training engine behind every ``train/`` entry point.

    config      dataclass configs → command line (``parse_config``) and recipes (field types: ``config_types``)
    cli         ``run_cli``: what stops an entry point becomes one ``error:`` line and an exit status
    files       atomic writes (temp file + fsync + rename), atomic directories, temporary-file cleanup
    rundir      run directory: config.json, log.txt, metrics.jsonl, tb/, results.json (main process only)
    checkpoint  step-named, checksummed accelerate checkpoints; resume resolution; safetensors snapshots
    ema         EMA of weights with warm-up and the (1 + δ)/(10 + δ) decay ramp, BN statistics copied
    datasets    the image container and the named datasets (digits, CIFAR, gmm-*, digits-mixture, npz:PATH)
    npz         validated, memory-mapped npz files and generated shards
    sampling    real/generated batch mixing, deterministic and resumable, sharded by rank (``BatchLoader``)
    augment     batched crop + flip

Heavier modules are imported by name: ``accelerator``, ``nonfinite`` and ``session`` (the engine of every run),
``models`` and ``classifiers`` (networks; building, saving and loading classifiers), ``attack_mode``,
``objectives`` (training losses), ``accuracy`` (clean / PGD), ``autoattack``, ``evaluation`` (all of them with
sanity checks), ``classifier_step`` (one optimizer step) and ``adversarial`` (classifier training),
``evaluate_command``, ``adam_loop`` (the loop of ``scorenet_training`` and ``posterior_training``),
``data_posterior`` (p_d for direct SCORE), ``generation`` and ``quality``.
"""

from .augment import random_crop_flip
from .checkpoint import (
    CheckpointMeta,
    CheckpointWarning,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    resolve_resume,
    save_checkpoint,
    save_step_checkpoint,
    save_weights,
    verify_checkpoint,
)
from .cli import run_cli
from .config import config_hash, config_to_dict, parse_config, save_config
from .datasets import ImageDataset, load_dataset
from .ema import EMA
from .files import (
    atomic_directory,
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_temporaries,
)
from .npz import load_generated, load_npz
from .rundir import RunDir
from .sampling import BatchLoader, MixedBatchSampler, ordered_batches

__all__ = [
    "EMA",
    "BatchLoader",
    "CheckpointMeta",
    "CheckpointWarning",
    "ImageDataset",
    "MixedBatchSampler",
    "RunDir",
    "atomic_directory",
    "atomic_save_npz",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cleanup_temporaries",
    "config_hash",
    "config_to_dict",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset",
    "load_generated",
    "load_npz",
    "load_weights",
    "ordered_batches",
    "parse_config",
    "random_crop_flip",
    "resolve_resume",
    "run_cli",
    "save_checkpoint",
    "save_config",
    "save_step_checkpoint",
    "save_weights",
    "verify_checkpoint",
]
