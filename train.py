"""Train an image classifier: `python train.py [group=option ...] [key=value ...]` (see README)."""

import logging
import math
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from animal_lightning.atomic import write_text_atomic
from animal_lightning.errors import AnimalLightningError
from animal_lightning.sweeps import ERROR_FILE
from animal_lightning.training import train

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The objective Hydra sweepers optimise: val/acc_best. In a sweep a job that fails returns None (the
    summary lists it as failed, Optuna records a failed trial) instead of stopping the other jobs."""
    sweeping = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg)
    except Exception as error:
        if not sweeping:
            if isinstance(error, AnimalLightningError):
                print(f"error: {error}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            raise
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        log.error("job failed: %s\n%s", reason, traceback.format_exc())
        write_text_atomic(Path(HydraConfig.get().runtime.output_dir) / ERROR_FILE, reason + "\n")
        return None
    objective = metrics.get("val/acc_best")
    return objective if objective is not None and math.isfinite(objective) else None


if __name__ == "__main__":
    main()
