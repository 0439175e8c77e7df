"""The LightningDataModule for a folder of photos (`data=animals`) and for the built-in demo set."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, WeightedRandomSampler

from animal_lightning.data.attributes import AttributeTable, load_attributes
from animal_lightning.data.datasets import ImageSamples, MixCollate
from animal_lightning.data.folders import DatasetIndex, index_dataset
from animal_lightning.data.imagenet_names import Match, imagenet_names, match_classes, read_class_map
from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.data.transforms import RESIZE_MODES, PreprocessSpec, eval_transform, train_transform
from animal_lightning.data.workers import default_num_workers, worker_context, worker_init
from animal_lightning.errors import DataError

log = logging.getLogger(__name__)

BALANCE_MODES = ("none", "sampler", "loss_weights")


def _settings(name: str, values: dict | None, consumer) -> dict:
    """A config block that is exactly the keyword arguments of `consumer`: a key it does not take is a
    one-line error naming the block and what it takes, not a TypeError later (or a setting silently ignored)."""
    values = dict(values or {})
    accepted = [p.name for p in inspect.signature(consumer).parameters.values() if p.kind == p.KEYWORD_ONLY
                or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise DataError(f"{name}.{unknown[0]} is not a setting of {name}: use {', '.join(accepted)}")
    return values


class AnimalDataModule(LightningDataModule):
    """Photos in root/train/<class>/ (and optional val/, test/), scanned and checked once.

    The class names are known as soon as `class_names` is read (before a model exists), so the
    model can be built for them; the transforms come later from the model's preprocessing spec
    through `use_preprocess`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        val_fraction: float = 0.15,
        split_seed: int = 42,
        balance: str = "none",
        on_bad_image: str = "skip",
        check_images: bool = True,
        test_labels: str | None = None,
        resize_mode: str = "crop",
        augment: dict | None = None,  # train_transform's arguments (data.augment)
        mix: dict | None = None,  # MixCollate's: mixup_alpha, cutmix_alpha (data.mix)
        pin_memory: bool | str = "auto",
        attributes: str | None = None,
        attribute_files: dict | None = None,
        unseen_classes: list[str] | None = None,  # zero-shot candidates without attributes (ImageNet knowledge)
        class_map: str | None = None,  # a file of "<class>: <ImageNet classes>" lines, overriding the WordNet match
        exclude: str | None = None,  # a file of photos to leave out (paths or globs), e.g. an audit's exclude.txt
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise DataError(f"data.balance={balance!r} is not one of: {', '.join(BALANCE_MODES)}")
        if resize_mode not in RESIZE_MODES:
            raise DataError(f"data.resize_mode={resize_mode!r} is not one of: {', '.join(RESIZE_MODES)}")
        if int(batch_size) < 1:
            raise DataError(f"data.batch_size={batch_size} must be at least 1")
        self.root = Path(root).expanduser()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = default_num_workers() if num_workers == "auto" else int(num_workers)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.balance = balance
        self.on_bad_image = on_bad_image
        self.check_images = bool(check_images)
        self.test_labels = test_labels
        self.exclude = str(exclude) if exclude else None
        self.resize_mode = resize_mode
        self.augment = _settings("data.augment", augment, train_transform)
        self.mix = _settings("data.mix", mix, MixCollate)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.attributes = attributes
        self.attribute_files = dict(attribute_files or {})
        if isinstance(unseen_classes, int) and not isinstance(unseen_classes, bool):
            raise DataError(f"data.unseen_classes={unseen_classes} must be a list of class names; the demo's number "
                            f"of held-out classes is data.held_out_classes={unseen_classes}")
        if isinstance(unseen_classes, str):
            raise DataError(f"data.unseen_classes={unseen_classes!r} must be a list: "
                            f"data.unseen_classes=[{unseen_classes}]")
        self.unseen_classes = [str(name) for name in unseen_classes or []]
        self.class_map = class_map
        self._matches: dict[str, Match] | None = None
        self.preprocess: PreprocessSpec | None = None
        self._index: DatasetIndex | None = None
        self._attribute_table: AttributeTable | None = None

    # -- what the rest of the project asks of the data -------------------------------------------------
    def prepare_dataset(self) -> None:
        """Make sure the folder exists on disk (the demo set generates itself here)."""

    @property
    def index(self) -> DatasetIndex:
        if self._index is None:
            self.prepare_dataset()
            self._index = index_dataset(self.root, val_fraction=self.val_fraction, seed=self.split_seed,
                                        on_bad_image=self.on_bad_image, test_labels=self.test_labels,
                                        check_images=self.check_images, exclude=self.exclude)
            idx = self._index
            log.info("dataset %s: %d classes, %d train / %d val (%s) / %d test (%s), %d unusable files left out%s",
                     idx.root, len(idx.class_names), len(idx.train), len(idx.val), idx.val_source,
                     len(idx.test), idx.test_source, len(idx.bad_images),
                     f", {len(idx.excluded)} excluded by data.exclude" if self.exclude else "")
        return self._index

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)

    @property
    def attribute_table(self) -> AttributeTable | None:
        """The class-attribute table of data.attributes (a folder, relative to the data root), or None."""
        if self.attributes is None:
            return None
        if self._attribute_table is None:
            self.prepare_dataset()
            folder = Path(self.attributes).expanduser()
            table = load_attributes(folder if folder.is_absolute() else self.root / folder, self.attribute_files)
            table.check_covers(self.class_names)
            unseen = table.unseen(self.class_names)
            log.info("attributes %s: %d attributes, %d seen classes, %d unseen (zero-shot candidates)%s",
                     table.source, len(table.predicates), len(self.class_names), len(unseen),
                     (": " + ", ".join(unseen[:10])) if unseen else "")
            self._attribute_table = table
        return self._attribute_table

    def attribute_hparams(self) -> dict | None:
        """What the model needs of the attribute table (plain data, saved in checkpoints), or None."""
        table = self.attribute_table
        return table.to_dict(self.class_names) if table else None

    @property
    def unseen_candidates(self) -> list[str]:
        """Classes without training images that prediction may name: the attribute table's, then the others of
        data.unseen_classes (ImageNet knowledge only)."""
        table = self.attribute_table
        first = table.unseen(self.class_names) if table else []
        seen = set(self.class_names)
        if seen & set(self.unseen_classes):
            raise DataError(f"data.unseen_classes lists {', '.join(sorted(seen & set(self.unseen_classes)))}, which "
                            f"have training images in {self.root / 'train'}: list only classes without one")
        return first + [name for name in dict.fromkeys(self.unseen_classes) if name not in first]

    @property
    def imagenet_matches(self) -> dict[str, Match]:
        """Every seen and candidate class's ImageNet classes (WordNet match, or data.class_map's line), logged
        once for the candidates. A data.unseen_classes name with neither a match nor attributes is refused."""
        if self._matches is None:
            candidates = self.unseen_candidates
            overrides = None
            if self.class_map:
                path = Path(self.class_map).expanduser()
                overrides = read_class_map(path if path.is_absolute() else self.root / path)
            self._matches = match_classes(self.class_names, candidates, overrides)
            table = self.attribute_table
            with_attributes = set(table.classes) if table else set()
            blind = [name for name in candidates if not self._matches[name].indices and name not in with_attributes]
            if blind:
                raise DataError(f"data.unseen_classes: {', '.join(blind[:5])} match no ImageNet class and have no "
                                "attribute row: map them in a data.class_map file ('<class>: <ImageNet class>'), "
                                "give them attributes, or leave them out")
            if candidates:
                log.info("unseen classes and what names them:\n%s", "\n".join(
                    "  " + self._matches[name].describe(imagenet_names())
                    + (" + attributes" if name in with_attributes else "") for name in candidates))
        return self._matches

    def zero_shot_hparams(self) -> dict:
        """The model's unseen_classes and imagenet_map arguments (plain data, saved in checkpoints)."""
        candidates = self.unseen_candidates
        if not candidates:
            return {"unseen_classes": None, "imagenet_map": None}
        table = self.attribute_table
        extra = [name for name in candidates if not table or name not in table.classes]
        mapped = {name: list(match.indices) for name, match in self.imagenet_matches.items() if match.indices}
        return {"unseen_classes": extra or None, "imagenet_map": mapped or None}

    def imagenet_matches_described(self) -> dict[str, str]:
        """For metrics.json: each unseen candidate's ImageNet classes, in words."""
        names = imagenet_names()
        return {name: self.imagenet_matches[name].describe(names) for name in self.unseen_candidates}

    @property
    def novel_class_names(self) -> list[str]:
        """Labelled test classes without training images: the zero-shot candidates first (the model's order),
        then any others. Their test labels are len(class_names) + position."""
        first = self.unseen_candidates
        others = sorted({name for _, name in self.index.novel_test} - set(first))
        return first + others

    def loss_weights(self) -> list[float] | None:
        """Inverse-frequency class weights (mean 1) when data.balance=loss_weights, else None."""
        if self.balance != "loss_weights":
            return None
        counts = self.index.class_counts(self.index.train)
        inverse = [1.0 / c for c in counts]
        scale = len(inverse) / sum(inverse)
        return [w * scale for w in inverse]

    @functools.cached_property  # the split is fixed once scanned; checkpoints are saved many times
    def validation_images(self) -> list[str]:
        """The validation split's files, relative to the root where they are inside it: what a checkpoint records,
        so that predict.py's engines calibrate on images the model was validated on."""
        root = self.index.root.resolve()
        paths = []
        for path, _ in self.index.val:
            resolved = Path(path).resolve()
            paths.append(resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved))
        return paths

    @property
    def test_labels_path(self) -> str | None:
        """The labels CSV that scores a flat test folder, resolved against the root, if there is one."""
        if not self.test_labels:
            return None
        path = Path(self.test_labels)
        path = path if path.is_absolute() else self.root / path
        return str(path.resolve()) if path.is_file() else None

    def use_preprocess(self, spec: PreprocessSpec) -> None:
        """The model's preprocessing (built with this dataset's resize mode): the transforms follow it."""
        if spec.resize_mode != self.resize_mode:
            raise DataError(f"the model evaluates images with resize_mode={spec.resize_mode!r} and data.resize_mode is "
                            f"{self.resize_mode!r}: build the model with resize_mode=datamodule.resize_mode")
        self.preprocess = spec

    # -- Lightning hooks --------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.prepare_dataset()

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None:
            raise RuntimeError("AnimalDataModule.use_preprocess(spec) must be called before setup: "
                               "the transforms follow the backbone's preprocessing spec")
        index = self.index
        evaluation = eval_transform(self.preprocess)  # the spec carries data.resize_mode (use_preprocess)
        self.train_set = ImageSamples(index.train, train_transform(self.preprocess, **self.augment))
        self.val_set = ImageSamples(index.val, evaluation)
        offset, novel = len(index.class_names), self.novel_class_names
        novel_samples = [(path, offset + novel.index(name)) for path, name in index.novel_test]
        self.test_set = ImageSamples(index.test + novel_samples, evaluation)

    def _loader(self, dataset: ImageSamples, batch_size: int, persistent: bool = True, **kwargs) -> DataLoader:
        """persistent=False: a loader read once (its workers end with the pass instead of living on)."""
        workers = self.num_workers
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=self.pin_memory,
                          multiprocessing_context=worker_context(workers),
                          persistent_workers=persistent and workers > 0,
                          worker_init_fn=worker_init if workers > 0 else None, **kwargs)

    def _train_collate(self):
        if not any(float(alpha) > 0 for alpha in self.mix.values()):
            return None
        return MixCollate(len(self.index.class_names), **self.mix)

    def train_dataloader(self) -> DataLoader:
        sampler = self._balanced_sampler() if self.balance == "sampler" else None
        return self._loader(self.train_set, self.batch_size, sampler=sampler, shuffle=sampler is None,
                            drop_last=self._drop_last(), collate_fn=self._train_collate())

    def _balanced_sampler(self) -> WeightedRandomSampler:
        """Draws every class equally often (with replacement), epoch after epoch from one generator."""
        counts = self.index.class_counts(self.index.train)
        weights = torch.tensor([1.0 / counts[label] for _, label in self.index.train], dtype=torch.double)
        generator = torch.Generator().manual_seed(self.split_seed)
        return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=generator)

    def _drop_last(self) -> bool:
        """A last training batch of one image breaks BatchNorm ("expected more than 1 value per channel");
        dropping the ragged remainder costs under one batch per epoch, and the shuffle varies which."""
        return len(self.train_set) > self.batch_size

    def _eval_loader(self, dataset: ImageSamples) -> DataLoader:
        """Under DDP each image goes to exactly one rank: Lightning's DistributedSampler would pad the ranks
        to equal length with repeated images, which the metrics and the confusion matrix would count twice."""
        sampler = None
        trainer = self.trainer  # set by Lightning once the datamodule is attached
        world = trainer.world_size if trainer is not None else 1
        if world > 1 and len(dataset) >= world:  # fewer images than ranks: Lightning's padded sampler, on every rank
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank,
                                                   shuffle=False)
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def probe_dataloader(self, split: str = "train") -> DataLoader:
        """Every image of a split with the evaluation transform, on every process: a linear probe's data."""
        samples = {"train": self.train_set.samples, "val": self.val_set.samples}[split]
        return self._loader(ImageSamples(samples, self.val_set.transform), self.eval_batch_size, persistent=False)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class SyntheticAnimalDataModule(AnimalDataModule):
    """The built-in demo set: procedural animals generated once under `root`/<spec key>/ and reused."""

    def __init__(self, root: str | os.PathLike = "data/synthetic", num_classes: int = 10,
                 train_per_class: int = 100, test_per_class: int = 20, image_size: int = 64,
                 held_out_classes: int = 0, seed: int = 0, **kwargs):
        self.spec = SyntheticSpec(num_classes=int(num_classes), train_per_class=int(train_per_class),
                                  test_per_class=int(test_per_class), image_size=int(image_size),
                                  unseen_classes=int(held_out_classes), seed=int(seed))
        self.parent = Path(root).expanduser()
        super().__init__(root=self.parent / self.spec.key(), **kwargs)

    def prepare_dataset(self) -> None:
        try:
            self.root = ensure_synthetic_dataset(self.parent, self.spec)
        except ValueError as error:
            raise DataError(f"data=synthetic: {error}") from error
