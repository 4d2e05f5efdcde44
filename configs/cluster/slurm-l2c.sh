#!/bin/bash
# Learning-to-Cache router training on SLURM: N nodes × 8 GPUs, one task per GPU, Lightning DDP over srun.
#
#   sbatch configs/cluster/slurm-l2c.sh configs/l2c/dit-xl-2-256-ddim20.yaml --data.init_args.root /datasets/imagenet/train
#   sbatch --nodes 2 configs/cluster/slurm-l2c.sh configs/l2c/dit-xl-2-256-ddim20.yaml \
#       --data.init_args.root /datasets/imagenet/train --data.init_args.batch_size 4   # still global batch 64
#   resume:  the same command with --ckpt_path last
#
# Everything after the config is passed to `train.py fit` unchanged. See configs/cluster/README.md.
#SBATCH --job-name=l2c
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # one task per GPU: Lightning requires it to equal trainer.devices (8)
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10           # ≥ data.init_args.num_workers (8) + 1 per GPU
#SBATCH --mem=0                      # all of the node's memory: every rank holds the fp32 teacher (~3 GB) on load
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=SIGUSR1@120         # Lightning saves an hpc checkpoint and requeues the job before the time limit
#SBATCH --requeue

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 CONFIG.yaml [train.py fit arguments ...]" >&2
    exit 2
fi
CONFIG=$1
shift

cd "${SLURM_SUBMIT_DIR:-.}"  # the recipes' run directories (runs/...) are relative to the repository
# Each rank loads the teacher itself: download a hub teacher once beforehand (configs/cluster/README.md) so that
# 8 × N ranks read the cache instead of racing to download it. Set HF_HUB_OFFLINE=0 to allow downloads.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "l2c: ${SLURM_NNODES} node(s) × ${SLURM_NTASKS_PER_NODE:-?} tasks, config ${CONFIG}, extra args: $*"
srun python train.py fit --config "$CONFIG" --trainer.num_nodes "$SLURM_NNODES" "$@"
