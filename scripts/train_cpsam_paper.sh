#!/usr/bin/env bash
# Cellpose-SAM pre-training at paper scale on one node of 8 GPUs (bf16), or the same steps at toy
# scale on the CPU with --smoke (what CI runs).
#   scripts/train_cpsam_paper.sh [--smoke] [key=value ...]
# Multi-node: scripts/accelerate/slurm_multinode.sh. Resume: run the same command again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ "${1:-}" = "--smoke" ]; then
    shift
    "$PY" scripts/prepare_shared_data.py runs/shared_canonical
    exec "$PY" -m cpsam train scripts/configs/tiny_cpu.yaml output_dir=runs/smoke/train_cpsam_paper \
        schedule.epochs=2 schedule.samples_per_epoch=32 val.every_epochs=2 val.max_images=1 resume=false "$@"
fi
exec accelerate launch --config_file scripts/accelerate/8gpu_bf16.yaml -m cpsam train \
    scripts/configs/cpsam_paper.yaml "$@"
