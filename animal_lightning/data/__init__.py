"""Data: folder scanning and checks, robust decoding, transforms, the DataModules, the demo set."""

from animal_lightning.data.datamodule import AnimalDataModule, SyntheticAnimalDataModule
from animal_lightning.data.transforms import PreprocessSpec

__all__ = ["AnimalDataModule", "PreprocessSpec", "SyntheticAnimalDataModule"]
