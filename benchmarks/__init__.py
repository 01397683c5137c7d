"""Speed and memory benchmarks: scripts that print ratios measured side by side (``python -m benchmarks.NAME``).

    attacks      our PGD (ℓ∞, ℓ2) against torchattacks' PGD and against the ideal K × (forward + input backward)
    train_step   seconds per step of TRADES-SE, PGD-AT and direct SCORE; score-net calls and host syncs per step
    data_path    images/s and peak memory of the training loader over 1M memory-mapped 32×32×3 generated images
    generation   images/s and network calls per image of DDPM, DDIM and DPM-Solver++; hours for 1M CIFAR images
    gpu          WRN-28-10 TRADES-SE / direct-SCORE steps at batch 512 in bf16 + channels-last (CUDA only)

Every benchmark alternates the compared runs (A B A B …), reports medians, records the machine, the thread count
and the load average, and prints its headline ratio on the last line. Figures and commands: benchmarks/README.md.
Shared pieces (timer, tables, machine record, FLOP and sync counters, GPU peaks) live in :mod:`benchmarks.common`.
"""
