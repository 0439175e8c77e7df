"""User-facing errors: each message is one line that names the path or setting and says what to do.

The entry points catch `AnimalLightningError` and print its message instead of a traceback, because
the user's next step is to fix a folder or an override, not to read Lightning's internals.
"""


class AnimalLightningError(Exception):
    """Base class for mistakes the user can fix from the message alone."""


class DataError(AnimalLightningError, ValueError):
    """The dataset folder, a file in it, or a data setting is unusable."""


class ModelConfigError(AnimalLightningError, ValueError):
    """A model, optimizer, scheduler or trainer setting cannot be honoured."""


class WeightsError(AnimalLightningError, RuntimeError):
    """Pretrained or local weights could not be obtained or do not fit the backbone."""


class CheckpointError(AnimalLightningError, ValueError):
    """A checkpoint is missing, damaged, not ours, or would need to run code to load."""
