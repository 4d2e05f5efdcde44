"""Sharing policies: `policy.push_to_hub(repo_id)`, `l2c.load_policy("owner/name")` through `huggingface_hub`, and
the model card `save_pretrained` writes.

There is no network here. Push is tested by injecting an `HfApi`-like client (`api=`) that records the calls and
copies the uploaded folder into a local stand-in for the hub: `huggingface_hub`'s own upload code is not run.
Loading runs the real `huggingface_hub.snapshot_download` in offline mode (`HF_HUB_OFFLINE=1`) against a cache
laid out as the hub client lays it out, in a subprocess so the client reads its environment as a user's would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from l2c_testing import ddim_timesteps, tiny_dit

import l2c
from l2c.models import load_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """Records what `push_policy` asks of the hub, and keeps each repository's files in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> str:
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
        return repo_id

    def upload_folder(self, *, repo_id: str, folder_path, commit_message: str | None = None) -> str:
        self.calls.append(("upload_folder", repo_id, {"commit_message": commit_message}))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return repo_id


def hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """A hub cache holding `files` as the `main` revision of model repository `repo_id` (huggingface_hub's layout:
    models--owner--name/refs/main names the commit, snapshots/<commit>/ holds the files)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files, repo / "snapshots" / COMMIT)
    return cache


def digits_policy() -> l2c.CachePolicy:
    transformer = load_model("embedded:digits").transformer
    return l2c.load_policy("static:interval=2").bind(transformer, ddim_timesteps(4), "DDIMScheduler")


def test_push_to_hub_uploads_the_policy_with_its_card(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    policy = digits_policy()
    assert policy.push_to_hub("owner/static2", api=hub, private=True, metrics={"flops_ratio": 0.55}) == "owner/static2"
    assert [call[:2] for call in hub.calls] == [("create_repo", "owner/static2"), ("upload_folder", "owner/static2")]
    assert hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert "static:interval=2" in hub.calls[1][2]["commit_message"]
    uploaded = hub.root / "owner/static2"
    assert sorted(os.listdir(uploaded)) == ["README.md", "config.json", "plan.png", "policy.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert 'l2c.load_policy("owner/static2")' in card and "| flops_ratio | 0.55 |" in card
    loaded = l2c.load_policy(uploaded)
    assert loaded.params() == policy.params() and loaded.target == policy.target


def test_push_to_hub_refuses_a_name_that_is_no_repository_id(tmp_path):
    with pytest.raises(ValueError, match="owner/name"):
        digits_policy().push_to_hub("static2", api=LocalHub(tmp_path))


def offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home")}


def test_a_hub_id_loads_and_samples_through_the_hub_client_offline(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    digits_policy().push_to_hub("owner/static2", api=hub)
    cache = hub_cache(tmp_path / "cache", "owner/static2", hub.root / "owner/static2")
    out = tmp_path / "out"
    argv = ["sample", "--policy", "owner/static2", "--steps", "4", "--num-samples", "2", "--no-progress"]
    done = subprocess.run([sys.executable, "infer.py", *argv, "--out", str(out)], cwd=ROOT, env=offline_env(cache),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == "owner/static2" and report["executed"] == {"compute": 2 * 6 * 2, "reuse": 2 * 6 * 2}


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path):
    (tmp_path / "cache").mkdir()
    argv = ["sample", "--policy", "owner/nosuch", "--steps", "4", "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "infer.py", *argv], cwd=ROOT, env=offline_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: policy 'owner/nosuch'") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists()


# -- the model card ---------------------------------------------------------------------------------------------------
def test_save_pretrained_writes_a_card_and_the_plan_picture_that_loading_ignores(tmp_path):
    policy = l2c.load_policy("static:interval=2").bind(tiny_dit(), ddim_timesteps(4), "DDIMScheduler")
    policy.provenance = {"trainer": "test", "seed": 3}
    path = policy.save_pretrained(tmp_path / "p")
    assert (path / "plan.png").stat().st_size > 0
    card = (path / "README.md").read_text()
    expected = ["dit, 2 blocks, branches attn1, ff, hidden size 16", "DDIMScheduler, 4 steps", '"trainer": "test"']
    expected += ["![plan](plan.png)", "Branch work in the plan: 50.0%", "Not measured", "policy.apply(pipe)"]
    expected += ["tags: [l2c, diffusers, caching-policy, static]"]
    for words in expected:
        assert words in card, (words, card)
    (path / "README.md").write_text("anything at all")  # a card edited by hand changes nothing
    (path / "plan.png").write_bytes(b"\x80 not a png")
    loaded = l2c.load_policy(path)
    assert loaded.params() == policy.params() and loaded.provenance == policy.provenance


def test_measured_numbers_are_on_the_card_and_in_the_provenance(tmp_path):
    policy = l2c.load_policy("toca").bind(tiny_dit(), ddim_timesteps(4), "DDIMScheduler")
    path = policy.save_pretrained(tmp_path / "p", metrics={"flops_ratio": 0.4123, "psnr_db": 30.5, "steps": 4})
    card = (path / "README.md").read_text()
    assert "| flops_ratio | 0.4123 |" in card and "| psnr_db | 30.5 |" in card and "Not measured" not in card
    assert l2c.load_policy(path).provenance["metrics"] == {"flops_ratio": 0.4123, "psnr_db": 30.5, "steps": 4}
    assert policy.provenance == {}  # the policy saved is not changed


def test_infer_saves_the_calibrated_policy_with_what_it_measured(tmp_path):
    import infer

    argv = ["sample", "--policy", "blockcache:threshold=0.2", "--calibration-samples", "2", "--steps", "4"]
    code = infer.main([*argv, "--num-samples", "2", "--no-progress", "--out", str(tmp_path / "out"),
                       "--save-policy", str(tmp_path / "saved")])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    saved = l2c.load_policy(tmp_path / "saved")
    metrics = saved.provenance["metrics"]
    assert metrics["flops_ratio"] == report["flops_ratio"] and metrics["psnr_db"] == report["psnr_db"]
    assert saved.provenance["calibration"] == {"runs": 1, "model_calls": 4}
    assert f"| flops_ratio | {report['flops_ratio']:.4g} |" in (tmp_path / "saved" / "README.md").read_text()
