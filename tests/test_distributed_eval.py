"""Distributed evaluation: `infer.py fid` under a real 2-process gloo run (Lightning's own launcher) draws exactly
the samples of a 1-process run and reports exactly the same metrics; each rank sampled its own slice."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import infer
from l2c.distributed_eval import SHARDS, load_samples
from l2c.sampling import initial_noise, noise_from_seeds, sample_seeds

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 10
ARGS = ["fid", "--model", "embedded:digits", "--policy", "static:interval=2", "--steps", "4",
        "--num-samples", str(NUM_SAMPLES), "--batch-size", "3", "--accelerator", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    assert infer.main([*ARGS, "--devices", "1", "--out", str(root / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)  # a fresh launch, whatever pytest runs under
    command = [sys.executable, "infer.py", *ARGS, "--devices", "2", "--out", str(root / "two")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return {"root": root, "stdout": result.stdout}


def report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


def test_two_processes_draw_exactly_the_samples_and_metrics_of_one(runs):
    one, two = runs["root"] / "one", runs["root"] / "two"
    labels1, images1 = load_samples(one, NUM_SAMPLES)
    labels2, images2 = load_samples(two, NUM_SAMPLES)
    assert torch.equal(labels1, torch.arange(NUM_SAMPLES) % 10)
    assert torch.equal(labels1, labels2) and torch.equal(images1, images2)
    assert images1.shape == (NUM_SAMPLES, 1, 16, 16) and images1.dtype == torch.uint8
    assert len(images1.unique()) > 10, "real samples, not a constant"
    first, second = report(one), report(two)
    assert (first["world_size"], second["world_size"]) == (1, 2)
    for key in ("digit_accuracy", "fd_digits"):
        assert first[key] == second[key], key
    assert first["digit_accuracy"] >= 0.8 and 0 < first["fd_digits"] < 680  # better than noise (≈ 680)
    assert "from 2 process(es)" in runs["stdout"]


def test_each_rank_sampled_its_own_slice(runs):
    shards = sorted((runs["root"] / "two" / SHARDS).glob("*.safetensors"))
    by_rank: dict[str, list[int]] = {}
    for shard in shards:
        by_rank.setdefault(shard.name[:8], []).extend(load_file(shard)["index"].tolist())
    assert sorted(by_rank) == ["rank0000", "rank0001"]
    assert set(by_rank["rank0000"]).isdisjoint(by_rank["rank0001"])
    assert sorted(by_rank["rank0000"] + by_rank["rank0001"]) == list(range(NUM_SAMPLES))
    assert [len(v) for v in by_rank.values()] == [5, 5]


def test_sample_noise_is_the_rows_of_the_sample_commands_noise():
    indices = torch.tensor([7, 0, 3])
    expected = initial_noise(10, (1, 16, 16), seed=4)[indices]
    assert torch.equal(noise_from_seeds(sample_seeds(indices, 4), (1, 16, 16)), expected)


def test_a_missing_shard_is_named(runs, tmp_path):
    shards = tmp_path / SHARDS
    shards.mkdir()
    for shard in sorted((runs["root"] / "two" / SHARDS).glob("rank0000-*.safetensors")):
        (shards / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(ValueError, match=r"shards hold 5 samples, expected indices 0\.\.9"):
        load_samples(tmp_path, NUM_SAMPLES)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_fid_without_torch_fidelity_fails_before_sampling_with_a_clear_message(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "real").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "real" / "a.png")
    code = infer.main([*ARGS, "--reference", str(tmp_path / "real"), "--out", str(tmp_path / "out")])
    assert code == 2
    message = capsys.readouterr().err
    assert "FID is unavailable here" in message and "torch-fidelity" in message and "fd_digits" in message
    assert not (tmp_path / "out").exists(), "nothing was sampled"


def test_fid_of_a_model_without_digits_metrics_needs_a_reference(tmp_path, capsys):
    from l2c_testing import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    argv = ["fid", "--model", str(tmp_path / "pipe"), "--steps", "4", "--out", str(tmp_path / "out")]
    assert infer.main(argv) == 2
    assert "--reference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--devices", "0"), ("--devices", "two"), ("--num-samples", "0"), ("--batch-size", "-1")]
)
def test_bad_process_and_sample_counts_exit_2(tmp_path, flag, value):
    argv = [*ARGS, flag, value, "--out", str(tmp_path / "out")]
    try:
        code = infer.main(argv)
    except SystemExit as exit_info:  # argparse's own refusal
        code = exit_info.code
    assert code == 2
    assert not (tmp_path / "out").exists()
