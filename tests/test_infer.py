"""infer.py on the embedded teacher: report keys (a contract), honest FLOPs ratios, clear errors on bad input."""

import json

import pytest

import infer

REPORT_KEYS = {"policy", "steps", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits"}


def run(tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    argv = ["sample", "--model", "embedded:digits", "--steps", "4", "--scheduler", "ddim", "--num-samples", "10"]
    code = infer.main([*argv, "--seed", "0", "--out", str(out), "--no-progress", *extra])
    report = json.loads((out / "report.json").read_text()) if code == 0 else {}
    return code, report


def test_full_policy_report_is_exactly_the_uncached_run(tmp_path):
    code, report = run(tmp_path, "--policy", "full")
    assert code == 0
    assert REPORT_KEYS <= set(report)
    assert report["flops_ratio"] == 1.0
    assert report["psnr_db"] == 100.0  # the documented cap for identical images
    assert report["ssim"] == pytest.approx(1.0)
    assert report["digit_accuracy"] == report["digit_accuracy_uncached"]
    assert report["executed"] == {"compute": 4 * 6 * 2}  # 4 steps × 6 blocks × (attn1, ff), one batch
    assert "beside" not in report  # nothing to compare the uncached model with
    for name in ("samples.png", "comparison.png", "plan.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_static_policy_counts_only_the_work_that_ran(tmp_path):
    code, report = run(tmp_path, "--policy", "static:interval=2", "--batch-size", "4", "--no-beside")
    assert code == 0
    assert report["policy"] == "static:interval=2"
    assert report["steps"] == 4
    # Steps 0 and 2 compute every branch; steps 1 and 3 reuse all; embeddings and the output head always run.
    assert report["executed"] == {"compute": 2 * 12 * 3, "reuse": 2 * 12 * 3}  # 3 batches (4 + 4 + 2 samples)
    assert report["plan_compute_fraction"] == 0.5
    assert 0.5 < report["flops_ratio"] < 0.6
    assert report["psnr_db"] < 100.0
    assert "beside" not in report


def test_static_every_n_and_native_taylorseer_are_sampled_beside_the_policy_from_the_same_noise(tmp_path, capsys):
    code, report = run(tmp_path, "--policy", "static:interval=2", "--batch-size", "4")
    assert code == 0
    static, seer = report["beside"]
    assert (static["method"], static["policy"]) == ("static every-N", "static:interval=2")
    assert (seer["method"], seer["policy"]) == (
        "TaylorSeer (native)",
        "taylorseer:interval=2,order=2,warmup=1,rule=taylor",
    )
    # The same policy from the same noise gives the same samples; TaylorSeer computes the same steps 0 and 2.
    assert static["psnr_db"] == report["psnr_db"] and static["flops_ratio"] == report["flops_ratio"]
    assert seer["executed"] == {"compute": 2 * 12 * 3, "forecast": 2 * 12 * 3}
    assert seer["flops_ratio"] == report["flops_ratio"] and seer["psnr_db"] != report["psnr_db"]
    printed = capsys.readouterr().out
    assert "taylorseer:interval=2,order=2,warmup=1" in printed and "--no-beside" in printed
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    assert lines["policy"].index("taylorseer:") == lines["psnr_db"].rindex(f"{seer['psnr_db']:.2f}")  # aligned


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("static:interval=0", "interval"),
        ("static:bogus=1", "unknown option"),
        ("nosuchpolicy", "unknown policy"),
    ],
)
def test_bad_policy_exits_2_naming_the_problem(tmp_path, capsys, policy, message):
    code, _ = run(tmp_path, "--policy", policy)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_steps_must_be_positive(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--steps", "0")
    assert exit_info.value.code == 2


def test_a_saved_latent_dit_pipeline_samples_through_its_vae(tmp_path):
    """`--model <dir>` with a diffusers DiT pipeline directory: latents, learned-sigma channels, VAE decode."""
    from l2c_testing import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tmp_path / "pipe"), "--policy", "static:interval=2", "--steps", "4"]
    code = infer.main([*argv, "--num-samples", "3", "--seed", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert "digit_accuracy" not in report  # digits metrics only for the digits-shaped model
    assert report["executed"] == {"compute": 2 * 2 * 2, "reuse": 2 * 2 * 2}  # 2 blocks × (attn1, ff)
    assert 0.5 < report["flops_ratio"] < 1.0
    assert (out / "samples.png").stat().st_size > 0
