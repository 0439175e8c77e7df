"""animal-lightning: train, sweep and predict animal-species image classifiers (Lightning + Hydra)."""

__version__ = "0.1.0"
