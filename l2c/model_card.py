"""The model card (`README.md`) and plan picture (`plan.png`) that `save_pretrained` writes beside a policy.

The card says what the policy was made for (model, scheduler, steps), how it was made (its provenance), what its
plan does, the quality and cost measured against the uncached model when they were measured (never estimated),
and how to apply it. Loading reads only `config.json` and `policy.safetensors`, so the card never changes a policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .options import SCHEDULERS

if TYPE_CHECKING:
    from .plan import Plan
    from .policies import CachePolicy

CARD_NAME = "README.md"
PLAN_PICTURE = "plan.png"
METRICS = "metrics"  # provenance key of the measured numbers (`flops_ratio`, `psnr_db`, …, and how they were run)


def model_card(policy: CachePolicy, plan: Plan, name: str | None = None) -> str:
    """The card's Markdown; `name` is how users load it (a hub id or a directory; default: a placeholder)."""
    target = policy.target
    model, steps = target.model, len(target.timesteps)
    source = name or "<this directory or hub id>"
    provenance = {k: v for k, v in policy.provenance.items() if k != METRICS}
    metrics = policy.provenance.get(METRICS)
    flag = _scheduler_flag(target.scheduler)  # how infer.py samples with it: the card's command repeats it
    lines = [
        "---",
        "library_name: l2c",
        f"tags: [{', '.join(dict.fromkeys(['l2c', 'diffusers', 'caching-policy', policy.kind]))}]",  # l2c's kind: once
        "---",
        "",
        f"# `{policy.describe()}`: a caching policy for a {model.family} transformer",
        "",
        "## Made for",
        "",
        f"- model: {model.family}, {model.num_blocks} blocks, branches {', '.join(model.branches)}, "
        f"hidden size {model.hidden_size}" + (f", {model.num_tokens} tokens" if model.num_tokens else ""),
        f"- scheduler: {target.scheduler or 'any (not recorded)'}, {steps} steps "
        f"(timesteps {_timesteps(target.timesteps)})" + (f"; `{flag.strip()}` in infer.py" if flag else ""),
        "",
        "## How it was made",
        "",
        *(["```json", json.dumps(provenance, indent=2), "```"] if provenance else ["No provenance recorded."]),
        "",
        "## Plan",
        "",
        f"![plan]({PLAN_PICTURE})",
        "",
        f"Branch work in the plan: {plan.compute_fraction():.1%} of the uncached model's"
        + (" (this policy also decides per sample at run time)" if _decides_at_run_time(policy) else "")
        + ".",
        "",
        "## Measured against the uncached model",
        "",
        *_metrics(metrics, source),
        "",
        "## How to apply",
        "",
        "```python",
        "import l2c",
        "",
        f'policy = l2c.load_policy("{source}")',
        f"policy.apply(pipe)  # a pipeline of the model above, with {target.scheduler or 'its scheduler'}",
        f"images = pipe(..., num_inference_steps={steps}).images",
        "```",
        "",
        f"or `python infer.py sample --model <the model> --policy {source} --steps {steps}{flag} --out out/`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(directory: Path, policy: CachePolicy, plan: Plan, name: str | None = None) -> None:
    """`README.md` and `plan.png` into `directory`."""
    from .plots import save_plan

    (directory / CARD_NAME).write_text(model_card(policy, plan, name))
    save_plan(plan, policy.target.model.branches, directory / PLAN_PICTURE, policy.describe())


def _scheduler_flag(scheduler_class: str | None) -> str:
    """` --scheduler NAME` that samples with `scheduler_class` in infer.py, or "" when it has no name there."""
    names = [name for name, cls in SCHEDULERS.items() if cls == scheduler_class]
    return f" --scheduler {names[0]}" if names else ""


def _decides_at_run_time(policy: CachePolicy) -> bool:
    from .policies import CachePolicy

    return type(policy).decide is not CachePolicy.decide


def _timesteps(timesteps: tuple[float, ...]) -> str:
    shown = [f"{t:g}" for t in timesteps]
    return ", ".join(shown) if len(shown) <= 8 else ", ".join(shown[:4] + ["…"] + shown[-2:])


def _metrics(metrics: dict | None, source: str) -> list[str]:
    if not metrics:
        return [
            "Not measured. `python infer.py sample --policy "
            f"{source} ...` measures flops_ratio and psnr_db against the uncached model on the same noise."
        ]
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in
             metrics.items()]  # fmt: skip
    return rows
