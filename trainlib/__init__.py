"""trainlib: the shared training engine behind every ``train/`` entry point.

    config      dataclass configs → command line (``parse_config``), recipes, ``run_cli`` error handling
    files       atomic writes (temp file + fsync + rename), atomic directories, temporary-file cleanup
    rundir      run directory: config.json, log.txt, metrics.jsonl, tb/, results.json (main process only)
    checkpoint  step-named, checksummed accelerate checkpoints; resume resolution; safetensors snapshots
    ema         EMA of weights with warm-up and the (1 + δ)/(10 + δ) decay ramp, BN statistics copied
    data        datasets (digits, CIFAR, toys, npz), memory-mapped generated shards, real/generated
                batch mixing, batched crop + flip augmentation

Heavier modules are imported by name: ``models`` (classifiers), ``objectives`` (training losses), ``evaluation``
(clean / PGD / AutoAttack with sanity checks), ``engine`` (accelerator, training session), ``adversarial``
(classifier training and evaluation commands), ``scorenet_training``, ``generation`` and ``quality``.
"""

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
from .config import config_hash, config_to_dict, parse_config, run_cli, save_config
from .data import (
    BatchLoader,
    ImageDataset,
    MixedBatchSampler,
    load_dataset,
    load_generated,
    load_npz,
    ordered_batches,
    random_crop_flip,
    toy_mixture,
)
from .ema import EMA
from .files import (
    atomic_directory,
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_temporaries,
)
from .rundir import RunDir

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
    "toy_mixture",
    "verify_checkpoint",
]
