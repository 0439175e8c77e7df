"""Config groups map 1:1 to what they build: every key of a block is an argument of its class or function,
and an argument's code default is the YAML's default (so code built directly gets the recipe users get)."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from animal_lightning.callbacks import EMA
from animal_lightning.data import AnimalDataModule
from animal_lightning.data.attributes import DEFAULT_FILES
from animal_lightning.data.datasets import MixCollate
from animal_lightning.data.transforms import train_transform
from animal_lightning.models import AnimalClassifier
from tests.conftest import CONF

# (config file, key of the block in it or "" for the whole file, what the block's keys are the arguments of)
BLOCKS = [
    ("data/animals.yaml", "", AnimalDataModule),
    ("data/animals.yaml", "augment", train_transform),
    ("data/animals.yaml", "mix", MixCollate),
    ("model/resnet50.yaml", "", AnimalClassifier),
    ("callbacks/ema.yaml", "ema", EMA),
]
NOT_ARGUMENTS = {"_target_", "defaults"}


def block(file: str, key: str) -> dict:
    loaded = OmegaConf.load(CONF / file)
    return OmegaConf.to_container(loaded[key] if key else loaded, resolve=False)


def defaults_of(consumer) -> dict:
    return {name: p.default for name, p in inspect.signature(consumer).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize(("file", "key", "consumer"), BLOCKS, ids=[f"{f}:{k or '*'}" for f, k, _ in BLOCKS])
def test_every_key_is_an_argument_and_defaults_agree(file, key, consumer):
    values = block(file, key)
    defaults = defaults_of(consumer)
    parameters = set(inspect.signature(consumer).parameters)
    assert set(values) - NOT_ARGUMENTS <= parameters, f"{file} {key}: keys that build nothing"
    for name, value in values.items():
        if name in NOT_ARGUMENTS or name not in defaults or (isinstance(value, str) and "${" in value):
            continue  # required arguments, and values computed from other settings (paths)
        if isinstance(value, dict):  # a block of its own, checked by its own row
            continue
        expected = list(defaults[name]) if isinstance(defaults[name], tuple) else defaults[name]
        assert value == expected, f"{file} {key}.{name}: YAML {value!r}, code default {defaults[name]!r}"


def test_the_attribute_file_names_are_the_loaders_defaults():
    assert block("data/animals.yaml", "attribute_files") == DEFAULT_FILES


def test_only_inception_sets_its_auxiliary_loss_weight():
    configs = {path.stem: OmegaConf.load(path) for path in (CONF / "model").glob("*.yaml")}
    assert [name for name, cfg in configs.items() if "aux_loss_weight" in cfg] == ["inception_v3"]
    assert configs["inception_v3"].aux_loss_weight == defaults_of(AnimalClassifier)["aux_loss_weight"]


def test_a_setting_the_block_does_not_take_is_a_one_line_error(tmp_path):
    from animal_lightning.errors import DataError

    with pytest.raises(DataError, match=r"data.augment.augment is not a setting of data.augment: use enabled, "):
        AnimalDataModule(tmp_path, augment={"augment": False})  # the key's name before data.augment.enabled
    with pytest.raises(DataError, match=r"data.mix.policy is not a setting of data.mix: use mixup_alpha, cutmix_alpha"):
        AnimalDataModule(tmp_path, mix={"policy": "none"})


def test_one_resize_mode_for_the_model_and_the_data(tmp_path):
    from animal_lightning.errors import DataError, ModelConfigError
    from animal_lightning.models import AnimalClassifier

    with pytest.raises(ModelConfigError, match=r"data.resize_mode='stretch' is not one of: crop, squash"):
        AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32, resize_mode="stretch")
    model = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32, resize_mode="squash")
    assert model.preprocess.resize_mode == "squash"  # the one computation of the spec, with the data's mode
    with pytest.raises(DataError, match=r"evaluates images with resize_mode='squash' and data.resize_mode is 'crop'"):
        AnimalDataModule(tmp_path, resize_mode="crop").use_preprocess(model.preprocess)
    squash = AnimalDataModule(tmp_path, resize_mode="squash")
    squash.use_preprocess(model.preprocess)
    assert squash.preprocess is model.preprocess
