"""What a page upload becomes before the model sees it: files checked for size, zips unpacked safely.

Uploads arrive in a temporary folder (Gradio's upload cache, which app.py points at a folder of its own).
A zip is unpacked into the request's own folder there and nowhere else (and removed after the request):
a member whose name is absolute, climbs out with `..`, is a link or a device, is itself a zip, or is no
photo is skipped and reported, and the number of entries and the unpacked total are capped, so a zip
bomb or a crafted name cannot fill the disk or write outside it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from animal_lightning.data.images import is_image_name
from animal_lightning.errors import DataError
from animal_lightning.prediction import Inputs, collect_inputs

MB = 1024 * 1024


@dataclass(frozen=True)
class UploadLimits:
    max_upload_mb: float = 50  # any one uploaded file (a photo or a zip)
    max_unpacked_mb: float = 2048  # a zip's members, unpacked, together
    max_files: int = 20000  # photos in one request


@dataclass
class Unpacked:
    """The images of one request (predict.py's Inputs) and what was left out of it, with the reason."""

    inputs: Inputs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def check_size(path: str | os.PathLike, name: str, limits: UploadLimits) -> None:
    size = os.path.getsize(path)
    if size > limits.max_upload_mb * MB:
        raise DataError(f"{name} is {size / MB:.1f} MB, over the {limits.max_upload_mb:g} MB upload limit: "
                        "send a smaller file, or start app.py with a larger max_upload_mb")


def is_zip(path: str | os.PathLike) -> bool:
    """By name, as the browser's file picker offers it (a photo that also parses as a zip stays a photo)."""
    return str(path).lower().endswith(".zip")


def upload_inputs(files: Sequence[str | os.PathLike], class_names: Sequence[str], workdir: Path,
                  limits: UploadLimits) -> Unpacked:
    """Photos (each a file of the upload) or one zip of them (flat, nested folders, or class folders that
    label it) as Inputs for predict_inputs. `workdir`: an empty folder of this request, for the zip's files."""
    files = [Path(f) for f in files]
    if not files:
        raise DataError("no files were uploaded: choose photos or a zip of them")
    for path in files:
        check_size(path, path.name, limits)
    zips = [path for path in files if is_zip(path)]
    if zips and len(files) > 1:
        raise DataError(f"{zips[0].name} is a zip among other files: upload one zip, or photos without a zip")
    if zips:
        return unpack_zip(zips[0], workdir, class_names, limits)
    if len(files) > limits.max_files:
        raise DataError(f"{len(files)} files in one request, over the limit of {limits.max_files}: send fewer")
    ids = _unique_ids([path.name for path in files])
    order = sorted(range(len(files)), key=lambda i: ids[i])
    inputs = Inputs([files[i] for i in order], [ids[i] for i in order], [None] * len(files),
                    f"{len(files)} uploaded file(s)")
    return Unpacked(inputs)


def unpack_zip(archive: Path, workdir: Path, class_names: Sequence[str], limits: UploadLimits) -> Unpacked:
    """The zip's photos, unpacked under workdir/unpacked/ (never outside it), as Inputs."""
    target = workdir / "unpacked"
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            if len(members) > 2 * limits.max_files + 1000:  # each entry costs memory before any is unpacked
                raise DataError(f"{archive.name} lists {len(members)} entries, far over the limit of "
                                f"{limits.max_files} photos in one request: send fewer")
            target.mkdir(parents=True, exist_ok=False)
            skipped, written, budget = [], 0, limits.max_unpacked_mb * MB
            for member in members:
                if member.is_dir():
                    continue
                name, reason = member_problem(member)
                if reason is None and written >= limits.max_files:
                    reason = f"over the limit of {limits.max_files} files in one request"
                if reason is None and member.file_size > budget:  # zipfile never reads past the header's size
                    reason = f"unpacks to more than the {limits.max_unpacked_mb:g} MB left of the unpacking limit"
                destination = target.joinpath(*name.parts)
                if reason is None:
                    try:
                        if not destination.resolve().is_relative_to(target.resolve()):  # after member_problem's
                            raise ValueError("its name leads outside the zip's folder")
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        with bundle.open(member) as source, destination.open("wb") as sink:
                            shutil.copyfileobj(source, sink, 1024 * 1024)
                    except ValueError as error:
                        reason = str(error)
                    except (OSError, zipfile.BadZipFile) as error:  # a name clash (x and x/y.jpg), a bad member
                        if destination.is_file():
                            destination.unlink()
                        reason = f"could not be unpacked ({type(error).__name__}: {error.strerror or error})" \
                            if isinstance(error, OSError) else f"could not be unpacked ({error})"
                if reason is not None:
                    skipped.append((member.filename, reason))
                    continue
                budget -= member.file_size
                written += 1
    except zipfile.BadZipFile as error:
        raise DataError(f"{archive.name} is not a readable zip ({error}): zip the photos again") from None
    except DataError:
        raise
    except (OSError, RuntimeError, NotImplementedError, EOFError) as error:  # encrypted, unsupported method, ...
        raise DataError(f"{archive.name} could not be unpacked ({type(error).__name__}: {error})") from None
    root = _inner_folder(target, set(class_names))
    try:
        inputs = collect_inputs(root, class_names, recursive=True)
    except DataError:
        raise DataError(f"no photos (jpg, jpeg, png, bmp, webp) in {archive.name}"
                        + (f"; left out: {_summary(skipped)}" if skipped else "")) from None
    inputs.description = f"zip {archive.name}" + (" (labelled by its class folders)" if inputs.labelled else "")
    return Unpacked(inputs, skipped)


def member_problem(member: zipfile.ZipInfo) -> tuple[PurePosixPath, str | None]:
    """A member's name as a relative path, and why it is not unpacked (None: it is)."""
    raw = member.filename.replace("\\", "/")
    name = PurePosixPath(raw)
    kind = stat.S_IFMT(member.external_attr >> 16)  # 0: a zip tool that records no file type
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        return name, "an absolute path: not unpacked"
    if ".." in name.parts:
        return name, "its name climbs out of the zip's folder (..): not unpacked"
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return name, "a link or special file: not unpacked"
    if any(part.startswith(".") or part == "__MACOSX" for part in name.parts):
        return name, "a hidden or system file"
    if name.suffix.lower() == ".zip":
        return name, "a zip inside the zip: unpack it, or upload it on its own"
    if not is_image_name(name.name):
        return name, "not a photo type (jpg, jpeg, png, bmp, webp)"
    return name, None


def _inner_folder(folder: Path, class_names: set[str]) -> Path:
    """A zip of one folder (photos/...) is read from inside that folder, as if the folder had been uploaded;
    a lone class folder stays, so that it still labels its photos."""
    for _ in range(64):
        entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in class_names:
            break
        folder = entries[0]
    return folder


def _unique_ids(names: Sequence[str]) -> list[str]:
    """The uploaded names, with `name (2).jpg` for a second file of the same name (as a browser saves it)."""
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        stem, suffix = os.path.splitext(name)
        ids.append(name if count == 1 else f"{stem} ({count}){suffix}")
    return ids


def _summary(skipped: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{name} ({reason})" for name, reason in skipped[:5]) + \
        (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")

