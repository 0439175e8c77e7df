"""Class names matched to ImageNet-1k classes through WordNet, and the class-map file that overrides them."""

from __future__ import annotations

import pytest

from animal_lightning.data import AnimalDataModule
from animal_lightning.data.imagenet_names import imagenet_names, match_classes, normalise, read_class_map
from animal_lightning.errors import DataError
from tests.conftest import make_folder

# ImageNet-1k class indices (every ImageNet head's order: the wnids sorted)
RED_FOX, KIT_FOX, ARCTIC_FOX, GREY_FOX = 277, 278, 279, 280
COLLIE, GORILLA, CHIMPANZEE, PORCUPINE, WOOD_RABBIT, ANGORA = 231, 366, 367, 334, 330, 332


@pytest.mark.parametrize(("name", "kind", "indices"), [
    ("gorilla", "exact", (GORILLA,)),
    ("collie", "exact", (COLLIE,)),
    ("chimp", "synonym", (CHIMPANZEE,)),  # chimpanzee, chimp, Pan troglodytes
    ("hedgehog", "synonym", (PORCUPINE,)),  # porcupine, hedgehog
    ("fox", "hypernym", (RED_FOX, KIT_FOX, ARCTIC_FOX, GREY_FOX)),  # the synset above the four foxes
    ("rabbit", "hypernym", (WOOD_RABBIT, ANGORA)),
    ("moose", "none", ()),  # WordNet knows it, but no ImageNet-1k class is a moose
    ("mouse", "none", ()),  # the animal, not ImageNet's computer mouse (n03793489)
    ("mole", "none", ()),  # the animal, not ImageNet's breakwater, groin, groyne, mole...
    ("crane", "exact", (134,)),  # the bird (n02012849), not the machine (n03126707)
    ("rhinoceros", "none", ()),
    ("zorblax", "none", ()),
])
def test_names_match_exactly_by_synonym_by_hypernym_or_not_at_all(name, kind, indices):
    match = imagenet_names().match(name)
    assert (match.kind, match.indices) == (kind, indices)


def test_names_are_normalised_and_plurals_fall_back_to_the_singular():
    names = imagenet_names()
    assert normalise("Giant+Panda") == normalise("giant_panda") == "giant panda"
    assert names.match("giant+panda").indices == names.match("giant panda").indices == (388,)
    assert names.match("Leopards").indices == names.match("leopard").indices == (288,)
    assert names.match("foxes").kind == "hypernym" and len(names.match("foxes").indices) == 4
    assert "red fox (n02119022)" in names.match("fox").describe(names)
    assert names.label(RED_FOX) == "red fox (n02119022)" and len(names.classes) == 1000
    assert "WordNet's elk, European elk, moose, Alces alces (n02432983) has no ImageNet class" in \
        names.match("moose").describe(names)


def test_a_hypernym_leaves_out_what_a_seen_class_stands_for():
    matches = match_classes(seen=["collie"], candidates=["dog", "fox"])
    assert matches["collie"].indices == (COLLIE,)
    assert COLLIE not in matches["dog"].indices and len(matches["dog"].indices) > 100  # the other dogs
    assert "less the classes of collie" in matches["dog"].via
    assert matches["fox"].indices == (RED_FOX, KIT_FOX, ARCTIC_FOX, GREY_FOX)
    whales = match_classes(seen=["antelope"], candidates=["whale", "killer+whale"])  # unseen classes too
    assert whales["whale"].indices == (147,) and whales["killer+whale"].indices == (148,)  # grey / killer whale


def test_a_class_map_overrides_the_automatic_match(tmp_path):
    path = tmp_path / "map.txt"
    path.write_text("# class: ImageNet classes\n"
                    "fox: red fox, n02119789   # by name and by wnid\n"
                    "gorilla:\n"  # nothing: attributes alone
                    "Horse: 339, sorrel\n"  # an index and a name giving the same class
                    "primate: n02480855, chimpanzee\n"  # any names, wnids and indices together
                    "\n")
    overrides = read_class_map(path)
    assert overrides["fox"].indices == (RED_FOX, KIT_FOX) and overrides["fox"].kind == "map"
    assert overrides["fox"].via == "map.txt line 2"
    matches = match_classes(["primate"], ["fox", "gorilla", "horse", "squirrel"], overrides)
    assert matches["gorilla"].indices == () and matches["gorilla"].kind == "map"  # the file wins over the exact match
    assert matches["horse"].indices == (339,)  # names compare normalised: Horse is horse
    assert matches["primate"].indices == (GORILLA, CHIMPANZEE)
    assert matches["squirrel"].kind == "hypernym"  # not in the file: matched automatically


@pytest.mark.parametrize(("line", "message"), [
    ("fox red fox", r"line 2 is 'fox red fox': expected '<class>: <ImageNet class name, wnid or index>"),
    ("fox: purple fox", r"line 2: 'purple fox' is not the name of an ImageNet class"),
    ("fox: 1000", r"line 2: 1000 is not a class index \(0-999\)"),
    ("fox: n09999999", r"line 2: n09999999 is neither an ImageNet-1k class nor a WordNet synset above one"),
    ("moose: n02432983", r"line 2: n02432983 is neither"),  # moose: WordNet, but no ImageNet class below it
    ("bird: crane", r"line 2: 'crane' names 2 ImageNet classes \(crane \(n02012849\), crane \(n03126707\)\): "
                    r"write the wnid"),
    ("collie: collie", r"line 2: class 'collie' is listed twice"),
])
def test_bad_class_map_lines_are_one_line_errors_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "map.txt"
    path.write_text(f"collie: collie\n{line}\n")
    with pytest.raises(DataError, match=message) as error:
        read_class_map(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_class_map_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"class map .*nope.txt not found: set data.class_map"):
        read_class_map(tmp_path / "nope.txt")


def test_the_datamodule_offers_unseen_classes_with_an_imagenet_match_and_refuses_the_others(tmp_path):
    root = make_folder(tmp_path / "ds", {"collie": 2, "blue+whale": 2})
    dm = AnimalDataModule(root, num_workers=0, check_images=False, unseen_classes=["fox", "gorilla"])
    assert dm.unseen_candidates == ["fox", "gorilla"]
    hparams = dm.zero_shot_hparams()
    assert hparams["unseen_classes"] == ["fox", "gorilla"]
    assert hparams["imagenet_map"]["fox"] == [RED_FOX, KIT_FOX, ARCTIC_FOX, GREY_FOX]
    assert hparams["imagenet_map"]["collie"] == [COLLIE]  # seen classes too: a hypernym candidate leaves them out
    assert "blue+whale" not in hparams["imagenet_map"]  # no ImageNet-1k class is a blue whale
    assert dm.novel_class_names == ["fox", "gorilla"]

    refused = AnimalDataModule(root, num_workers=0, check_images=False, unseen_classes=["moose", "fox"])
    with pytest.raises(DataError, match="data.unseen_classes: moose match no ImageNet class and have no attribute "
                                        "row: map them in a data.class_map file"):
        refused.zero_shot_hparams()
    (root / "map.txt").write_text("moose: ox, hartebeest  # the user's choice of the nearest ImageNet classes\n")
    mapped = AnimalDataModule(root, num_workers=0, check_images=False, unseen_classes=["moose"], class_map="map.txt")
    assert mapped.zero_shot_hparams()["imagenet_map"]["moose"] == [345, 351]  # the file, relative to the data root

    with pytest.raises(DataError, match="data.unseen_classes lists collie, which have training images"):
        AnimalDataModule(root, num_workers=0, check_images=False, unseen_classes=["collie"]).zero_shot_hparams()
    with pytest.raises(DataError, match=r"data.unseen_classes='fox' must be a list: data.unseen_classes=\[fox\]"):
        AnimalDataModule(root, unseen_classes="fox")
    with pytest.raises(DataError, match="data.unseen_classes=4 must be a list of class names; the demo's number of "
                                        "held-out classes is data.held_out_classes=4"):
        AnimalDataModule(root, unseen_classes=4)  # the demo's key before it was renamed
    assert AnimalDataModule(root, num_workers=0, check_images=False).zero_shot_hparams() == \
        {"unseen_classes": None, "imagenet_map": None}
