"""Which ImageNet-1k classes a class name stands for: matched through WordNet, or given in a class-map file.

An ImageNet-pretrained network already knows "chimpanzee", "red fox" or "wood rabbit". To let it
name a class that has no training photo, each class name is matched to ImageNet-1k classes:

- exact: the name is the first name of an ImageNet class (`gorilla`, `collie`);
- synonym: it is one of an ImageNet class's other names (`hedgehog` is `porcupine, hedgehog`);
- hypernym: it names a WordNet synset above ImageNet classes, which it then stands for together
  (`fox`: red fox, kit fox, Arctic fox, grey fox; `rabbit`: wood rabbit, Angora);
- none: nothing in ImageNet-1k or above it (`moose`, `rhinoceros`): attributes alone can name it.

A name with an animal sense means the animal: `mouse` is not the computer mouse, `mole` not the
breakwater, `crane` the bird and not the machine. Names are compared lower-case with `+`, `_` and
`-` as spaces (AwA2 writes `giant+panda`), and a plural falls back to its singular (`Leopards`).
The synsets come from `imagenet_hierarchy.tsv`: the 1000 classes, every WordNet 3.0 noun synset
above them and every synset below animal (scripts/imagenet_hierarchy.py writes it;
WORDNET_LICENSE beside it).

A class-map file (data.class_map) overrides the automatic match, one class per line:

    # class: ImageNet classes (a name, a wnid such as n02119022, or a class index 0-999)
    fox: red fox, kit fox, n02120079
    moose:                  # nothing: attributes alone
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from animal_lightning.errors import DataError

log = logging.getLogger(__name__)

HIERARCHY = Path(__file__).with_name("imagenet_hierarchy.tsv")
NUM_CLASSES = 1000
ANIMAL = "n00015388"  # WordNet's animal, animate being, beast, brute, creature, fauna
KINDS = ("exact", "synonym", "hypernym", "map", "none")
_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Synset:
    wnid: str
    parents: tuple[str, ...]
    lemmas: tuple[str, ...]  # WordNet's names for it, the first one the usual name


@dataclass(frozen=True)
class Match:
    """What a class name was matched to: ImageNet-1k class indices, how (KINDS), and through which synset."""

    name: str
    indices: tuple[int, ...]
    kind: str
    via: str = ""  # exact/synonym: the ImageNet class's names; hypernym: the synset above them; map: the file

    def describe(self, names: ImageNetNames) -> str:
        if not self.indices:
            return f"{self.name}: no ImageNet class" + (f" ({self.via})" if self.via else "")
        shown = ", ".join(names.label(i) for i in self.indices[:6])
        more = f" and {len(self.indices) - 6} more" if len(self.indices) > 6 else ""
        return f"{self.name}: ImageNet {shown}{more} [{self.kind}{': ' + self.via if self.via else ''}]"


class ImageNetNames:
    """The 1000 ImageNet classes (in the class-index order of every ImageNet head) and the WordNet synsets
    above them, with lookups by name."""

    def __init__(self, synsets: Mapping[str, Synset], classes: Sequence[str]):
        self.synsets = dict(synsets)
        self.classes = tuple(classes)
        self.index = {wnid: i for i, wnid in enumerate(self.classes)}
        self._by_lemma: dict[str, list[str]] = {}
        for synset in self.synsets.values():
            for lemma in synset.lemmas:
                self._by_lemma.setdefault(normalise(lemma), []).append(synset.wnid)
        children: dict[str, list[str]] = {}
        for synset in self.synsets.values():
            for parent in synset.parents:
                children.setdefault(parent, []).append(synset.wnid)
        self._children = children
        self.animals = self._below(ANIMAL)

    def label(self, index: int) -> str:
        """`red fox (n02119022)`: an ImageNet class's usual name and its wnid."""
        wnid = self.classes[index]
        return f"{self.synsets[wnid].lemmas[0]} ({wnid})"

    def _below(self, wnid: str) -> set[str]:
        """A synset and every synset below it."""
        found, stack = set(), [wnid]
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack.extend(self._children.get(current, ()))
        return found

    def classes_under(self, wnid: str) -> tuple[int, ...]:
        """The ImageNet classes at or below a synset, in class-index order."""
        return tuple(sorted(self.index[w] for w in self._below(wnid) if w in self.index))

    def match(self, name: str, prefer_animals: bool = True) -> Match:
        """The automatic match of a class name (exact, synonym, hypernym, or none); with prefer_animals, a name
        with an animal sense means the animal."""
        known = []
        for form in _forms(name):
            wnids = self._by_lemma.get(form, [])
            if prefer_animals and any(w in self.animals for w in wnids):  # this project names animals
                wnids = [w for w in wnids if w in self.animals]
            known = known or wnids
            direct = [w for w in wnids if w in self.index]
            if direct:
                first = all(normalise(self.synsets[w].lemmas[0]) == form for w in direct)
                via = "; ".join(", ".join(self.synsets[w].lemmas) for w in direct)
                return Match(name, tuple(sorted(self.index[w] for w in direct)), "exact" if first else "synonym", via)
            above = [w for w in wnids if w not in self.index]
            if above:
                indices = tuple(sorted({i for w in above for i in self.classes_under(w)}))
                if indices:
                    via = "; ".join(f"{self.synsets[w].lemmas[0]} ({w})" for w in above)
                    return Match(name, indices, "hypernym", via)
        via = "; ".join(f"WordNet's {', '.join(self.synsets[w].lemmas)} ({w})" for w in known)
        return Match(name, (), "none", f"{via} has no ImageNet class below it" if via else "")

    def resolve(self, target: str) -> tuple[int, ...] | str:
        """A class-map target (an ImageNet class name, a wnid or an index) as class indices, or why not."""
        target = target.strip()
        if target.isdigit():
            index = int(target)
            return (index,) if index < NUM_CLASSES else f"{target} is not a class index (0-{NUM_CLASSES - 1})"
        if _WNID.fullmatch(target):
            below = self.classes_under(target) if target in self.synsets else ()
            return below or f"{target} is neither an ImageNet-1k class nor a WordNet synset above one"
        found = self.match(target, prefer_animals=False)  # a name written in a class map must say which it means
        if not found.indices:
            return f"{target!r} is not the name of an ImageNet class or of a WordNet synset above one"
        if found.kind != "hypernym" and len(found.indices) > 1:
            return (f"{target!r} names {len(found.indices)} ImageNet classes "
                    f"({', '.join(self.label(i) for i in found.indices)}): write the wnid of the one you mean")
        return found.indices


def normalise(name: str) -> str:
    """Lower case, with +, _ and - as spaces and runs of spaces as one."""
    return " ".join(re.sub(r"[+_\-]", " ", str(name)).lower().split())


def _forms(name: str) -> list[str]:
    """The name, then its singular where it looks plural (leopards, foxes, butterflies)."""
    form = normalise(name)
    forms = [form]
    if form.endswith("ies") and len(form) > 4:
        forms.append(form[:-3] + "y")
    if form.endswith("es") and len(form) > 3:
        forms.append(form[:-2])
    if form.endswith("s") and not form.endswith("ss") and len(form) > 2:
        forms.append(form[:-1])
    return forms


@functools.lru_cache(maxsize=1)
def imagenet_names(path: str | None = None) -> ImageNetNames:
    """The packaged hierarchy (or another file in its format): `wnid<TAB>parents<TAB>lemmas<TAB>class index`."""
    source = Path(path) if path else HIERARCHY
    synsets, classes = {}, {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        wnid, parents, lemmas, index = (line.split("\t") + ["", "", ""])[:4]
        synsets[wnid] = Synset(wnid, tuple(parents.split()), tuple(s.strip() for s in lemmas.split(",")))
        if index.strip():
            classes[int(index)] = wnid
    if sorted(classes) != list(range(NUM_CLASSES)):
        raise DataError(f"{source} lists {len(classes)} ImageNet classes instead of {NUM_CLASSES}: "
                        "reinstall the project (it is package data)")
    return ImageNetNames(synsets, [classes[i] for i in range(NUM_CLASSES)])


def read_class_map(path: str | os.PathLike, names: ImageNetNames | None = None) -> dict[str, Match]:
    """A class-map file as {class name: Match(kind="map")}; every problem is a one-line DataError naming the
    file and the line."""
    names = names or imagenet_names()
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"class map {path} not found: set data.class_map to a text file of "
                        "'<class>: <ImageNet class>, ...' lines (relative to the data root or absolute)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read class map {path} ({type(error).__name__}): it should be UTF-8 text") from None
    mapping: dict[str, Match] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, targets = line.partition(":")
        name = name.strip()
        if not colon or not name:
            raise DataError(f"class map {path} line {number} is {raw.strip()!r}: expected "
                            "'<class>: <ImageNet class name, wnid or index>, ...' (nothing after ':' for none)")
        if normalise(name) in {normalise(known) for known in mapping}:
            raise DataError(f"class map {path} line {number}: class {name!r} is listed twice; keep one line")
        indices: set[int] = set()
        for target in (t.strip() for t in targets.split(",")):
            if not target:
                continue
            resolved = names.resolve(target)
            if isinstance(resolved, str):
                raise DataError(f"class map {path} line {number}: {resolved}")
            indices.update(resolved)
        mapping[name] = Match(name, tuple(sorted(indices)), "map", f"{path.name} line {number}")
    return mapping


def match_classes(seen: Sequence[str], candidates: Sequence[str], overrides: Mapping[str, Match] | None = None,
                  names: ImageNetNames | None = None) -> dict[str, Match]:
    """The match of every seen and candidate class, the class map's lines first.

    A candidate matched through a hypernym leaves out the ImageNet classes of every narrower class, seen or
    unseen (with `collie` among the classes, an unseen `dog` means the other dogs; with `killer whale`, an
    unseen `whale` means the grey whale): a photo must not count as evidence for two classes at once."""
    names = names or imagenet_names()
    overrides = {normalise(key): value for key, value in (overrides or {}).items()}
    matches = {}
    for name in [*seen, *candidates]:
        override = overrides.get(normalise(name))
        matches[name] = Match(name, override.indices, "map", override.via) if override else names.match(name)
    matched = dict(matches)  # before any trimming
    for name in candidates:
        match, mine = matched[name], set(matched[name].indices)
        if match.kind != "hypernym":
            continue
        narrower = [other for other, m in matched.items() if other != name and m.indices and mine & set(m.indices)
                    and (m.kind != "hypernym" or set(m.indices) < mine)]
        if narrower:
            claimed = {i for other in narrower for i in matched[other].indices}
            left = tuple(i for i in match.indices if i not in claimed)
            via = f"{match.via}, less the classes of {', '.join(narrower)}"
            matches[name] = Match(name, left, "hypernym" if left else "none", via)
    unused = sorted(set(overrides) - {normalise(name) for name in [*seen, *candidates]})
    if unused:
        log.warning("class map lines for classes this run does not have (ignored): %s", ", ".join(unused[:10]))
    return matches


def describe_matches(matches: Mapping[str, Match], classes: Iterable[str], names: ImageNetNames | None = None) -> str:
    names = names or imagenet_names()
    return "\n".join("  " + matches[name].describe(names) for name in classes)
