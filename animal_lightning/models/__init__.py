"""Models: the backbone factory, learning-rate schedules and the LightningModule."""

from animal_lightning.models.backbones import available, create_backbone, preprocess_spec
from animal_lightning.models.classifier import AnimalClassifier

__all__ = ["AnimalClassifier", "available", "create_backbone", "preprocess_spec"]
