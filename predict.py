"""Predict images from a checkpoint: `python predict.py [ckpt_path=...] [input=...] [key=value ...]` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from animal_lightning.errors import AnimalLightningError
from animal_lightning.prediction import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except AnimalLightningError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
