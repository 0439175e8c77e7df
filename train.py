"""Train an image classifier: `python train.py [group=option ...] [key=value ...]` (see README)."""

import sys
import warnings

import hydra
from omegaconf import DictConfig

from animal_lightning.errors import AnimalLightningError
from animal_lightning.training import train

# Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates: harmless, printed every run.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except AnimalLightningError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return metrics.get("val/acc_best")  # the objective Hydra sweepers optimise


if __name__ == "__main__":
    main()
