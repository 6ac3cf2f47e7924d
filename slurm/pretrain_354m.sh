#!/bin/bash
# TokenFormer OWT 354M: stage 2 of progressive scaling (INIT_FROM: the expanded 124M checkpoint).
# N nodes x 8 GPUs, one rank per GPU, TP and ZeRO from the config. Submit from the repository root:
#   sbatch slurm/pretrain_354m.sh [trainer args]          (env overrides and CPU use: docs/slurm.md)
#SBATCH --job-name=tf-354m
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
CONFIG="${CONFIG:-configs/owt_354m.yaml}"
RUN_DIR="${RUN_DIR:-runs/owt_354m}"
# shellcheck source=slurm/common.sh
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
