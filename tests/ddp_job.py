"""Run by tests/test_ddp.py as `python tests/ddp_job.py <workdir> <data root> <data overrides...>`: train the
demo data with
trainer=ddp_cpu (2 processes, gloo). Lightning re-runs this script for rank 1; each rank writes the metrics
it ended with to <workdir>/rank<N>.json, so the test can compare them."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from tests.conftest import FAST, compose_config  # noqa: E402


def main() -> None:
    work, data, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    cfg = compose_config("train", work, "experiment=demo", f"data.root={data}", *overrides, *FAST,
                         "trainer=ddp_cpu", "trainer.max_epochs=2", "data.batch_size=8",
                         "callbacks.augmentation_samples=null")
    HydraConfig.instance().cfg = None  # a plain script to Lightning: its launcher re-runs it for rank 1
    from animal_lightning.training import train

    metrics = train(cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    values = {k: v for k, v in metrics.items() if k != "best_checkpoint"}
    (work / f"rank{rank}.json").write_text(json.dumps(values, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
