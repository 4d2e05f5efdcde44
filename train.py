"""Train the embedded teacher or a caching-policy predictor: `python train.py fit --config configs/...`.

`python train.py fit --help` lists the trainers and data modules (`--model` / `--data`, by class name or path);
`python train.py fit --model.help SegmentRouterTrainer` (or any of them) documents every setting of that class.

A setting the trainers or data modules refuse (a ValueError or FileNotFoundError while they are built, e.g.
`--model.init_args.export_budget 1.5` or a missing teacher directory) ends in one line on stderr and exit code 2,
as `infer.py` does; errors while training keep their tracebacks.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

# Imported so that LightningCLI knows them: `--help` lists them and accepts their bare class names.
from data import conditions, digits, imagefolder, prompts  # noqa: F401
from predictors import l2c_trainer, teacher, tokencache_trainer  # noqa: F401

PROJECT = Path(__file__).resolve().parent
INPUT_ERRORS = (ValueError, FileNotFoundError)


class SettingRefused(Exception):
    """A trainer or data module refused a setting while being built; the message is the one line to print."""


def refusal(error: BaseException) -> str:
    """The message of the deepest input error in `error`'s chain that this project's code raised (the trainer's
    own message, not the jsonargparse union error wrapping it); else the deepest input error's."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    inputs = [e for e in chain if isinstance(e, INPUT_ERRORS)]
    ours = [e for e in inputs if _raised_in_project(e)]
    return str((ours or inputs or chain)[-1])


def _raised_in_project(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return (
        bool(frames)
        and Path(frames[-1].filename).resolve().is_relative_to(PROJECT)
        and "site-packages" not in (frames[-1].filename)
    )


class CLI(LightningCLI):
    """LightningCLI whose refusals of input while building the classes become `SettingRefused`."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except INPUT_ERRORS as error:
            raise SettingRefused(refusal(error)) from error


def main() -> None:
    try:
        CLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    except SettingRefused as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
