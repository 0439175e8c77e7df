"""Lightning's lines that a user of this project can do nothing about, kept off the console.

Called where the project configures a Trainer (training and prediction), not at import: it filters only
the messages named here, from Lightning's own logger and warnings; everything else (progress, device and
precision lines, real warnings) still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

# rank_zero_info lines, by a regular expression matching their start
NOISE = re.compile("|".join((
    "💡 Tip:",  # an advert for Lightning's cloud logger
    "Trainer already configured with model summary callbacks",  # conf/callbacks chose RichModelSummary itself
    r"`Trainer\(limit_\w+=1\.0\)` was configured so 100%",  # 1.0 given explicitly: the default, said aloud
    "Loading `train_dataloader` to estimate number of stepping batches",  # the schedule's length, as designed
)))
# warnings, by a regular expression matching their start
NOISE_WARNINGS = (
    r"Precision .* is not supported by the model summary",  # the size in MB is estimated at 32 bits: harmless
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning 2.6 calls a torch.utils._pytree API torch 2.14 deprecates
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NOISE.match(str(record.msg)) is None


def quiet_lightning() -> None:
    """Drop the NOISE lines and NOISE_WARNINGS from here on (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
