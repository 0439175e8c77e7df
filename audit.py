"""Audit a dataset folder before training: `python audit.py data.root=/data/animals [key=value ...]` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from animal_lightning.audit.pipeline import run_audit
from animal_lightning.errors import AnimalLightningError


@hydra.main(version_base="1.3", config_path="conf", config_name="audit")
def main(cfg: DictConfig) -> None:
    try:
        run_audit(cfg)
    except AnimalLightningError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
