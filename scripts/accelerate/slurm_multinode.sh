#!/usr/bin/env bash
# SLURM: N nodes x 8 GPUs, one `accelerate launch` per node (srun), CP-SAM pre-training.
#   sbatch --nodes 2 scripts/accelerate/slurm_multinode.sh scripts/configs/cpsam_paper.yaml [key=value ...]
# A time limit or scancel sends SIGTERM: the run writes a checkpoint and exits; resubmitting the same
# job resumes from it exactly (same output_dir), on any number of nodes.
#SBATCH --job-name=cpsam-train
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch --nodes N slurm_multinode.sh CONFIG.yaml [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --multi_gpu --mixed_precision bf16 \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_NODE --main_process_port $MAIN_PORT \
  -m cpsam train $CONFIG $*"
