"""Try a trained checkpoint in the browser: `python app.py [ckpt_path=...] [port=7860] [key=value ...]` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from animal_lightning.errors import AnimalLightningError


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg: DictConfig) -> None:
    from animal_lightning.app.server import run_app

    try:
        run_app(cfg)
    except AnimalLightningError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
