"""Train the embedded teacher or a caching-policy predictor: `python train.py fit --config configs/...`."""

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
