"""Train the embedded teacher or a caching-policy predictor: `python train.py fit --config configs/...`.

`python train.py fit --help` lists the trainers and data modules (`--model` / `--data`, by class name or path);
`python train.py fit --model.help SegmentRouterTrainer` (or any of them) documents every setting of that class.
"""

from lightning.pytorch.cli import LightningCLI

# Imported so that LightningCLI knows them: `--help` lists them and accepts their bare class names.
from data import conditions, digits, imagefolder, prompts  # noqa: F401
from predictors import l2c_trainer, teacher, tokencache_trainer  # noqa: F401


def main() -> None:
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
