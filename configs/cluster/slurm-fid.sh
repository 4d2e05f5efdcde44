#!/bin/bash
# Sampling for quality metrics on SLURM: N nodes × 8 GPUs, every rank samples its own slice of the (label, seed)
# pairs, rank 0 merges the shards and computes the metrics (infer.py fid; docs/cluster.md).
#
#   sbatch configs/cluster/slurm-fid.sh --model facebook/DiT-XL-2-256 --policy runs/l2c-dit-xl-2-256-ddim20/policy \
#       --steps 20 --scheduler ddim --guidance-scale 1.5 --num-samples 50000 --reference /datasets/imagenet/val \
#       --dtype bf16 --out out/fid-l2c-ddim20
#
# Everything is passed to `infer.py fid` unchanged; the script adds the accelerator, devices and node count.
#SBATCH --job-name=l2c-fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # one task per GPU: Lightning requires it to equal --devices
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 [infer.py fid arguments ...]" >&2
    exit 2
fi

cd "${SLURM_SUBMIT_DIR:-.}"
# Download the model, and run FID once on a login node so torch-fidelity's Inception weights are in
# $TORCH_HOME, before submitting: the ranks must not race to download (docs/cluster.md).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

srun python infer.py fid --accelerator gpu --devices "${SLURM_NTASKS_PER_NODE}" --num-nodes "${SLURM_NNODES}" "$@"
