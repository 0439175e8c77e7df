"""Checkpoints, in one place: where a run keeps them, which one a command means, reading one safely,
checking one against a run, and what animal-lightning stores in them besides Lightning's state.

A checkpoint holds only tensors and plain data, so torch.load(weights_only=True) reads it: a planted
pickle cannot run. `CHECKPOINT_KEY` is our entry (class names, backbone, preprocessing, calibration,
where the data was); `RNG_KEY` the random streams at the save, for resuming exactly where training was.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from animal_lightning.errors import CheckpointError

CHECKPOINT_KEY = "animal_lightning"  # the checkpoint entry that prediction reads
CHECKPOINT_FORMAT = 1
RNG_KEY = "rng_states"  # the random streams at the save, for resuming exactly where training was


# -- where they are, which one is meant -------------------------------------------------------------------
def last_checkpoint_in(folder: str | Path) -> Path:
    """ModelCheckpoint's last.ckpt in `folder`."""
    return Path(folder) / (ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)


def checkpoint_path(trainer: Trainer) -> Path:
    """Where the run's ModelCheckpoint keeps last.ckpt (the file train.py resumes from)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
    return last_checkpoint_in(callback.dirpath if callback is not None else Path(trainer.default_root_dir) /
                              "checkpoints")


def last_checkpoint(checkpoint: ModelCheckpoint | None) -> str | None:
    """last.ckpt's path; after ddp_spawn only the best path comes back from the ranks, so look in its folder."""
    if checkpoint is None:
        return None
    if checkpoint.last_model_path:
        return checkpoint.last_model_path
    if checkpoint.save_last and checkpoint.dirpath:
        path = last_checkpoint_in(checkpoint.dirpath)
        return str(path) if path.is_file() else None
    return None


def resolve_checkpoint(ckpt_path: str | None, log_dir: str | os.PathLike) -> Path:
    """`best`, `last` or None: that file of the newest training run under log_dir; else the path given."""
    if ckpt_path in (None, "", "best", "last"):
        name = f"{ckpt_path or 'best'}.ckpt"
        train_logs = Path(log_dir) / "train"
        found = list(train_logs.glob(f"runs/*/checkpoints/{name}")) + \
            list(train_logs.glob(f"multiruns/*/*/checkpoints/{name}"))
        if not found:
            raise CheckpointError(f"no {name} under {train_logs}: train first (python train.py) or pass "
                                  "ckpt_path=/path/to/checkpoint.ckpt")
        return max(found, key=lambda p: p.stat().st_mtime).resolve()
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass ckpt_path=best, last or /path/to/checkpoint.ckpt")
    return path



# -- reading and checking --------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> tuple[dict, dict]:
    """(the checkpoint, its animal-lightning metadata), loaded with torch.load(weights_only=True), which refuses
    pickled objects, so a planted payload cannot run. A file that is missing, damaged, not a checkpoint, or not
    one of ours is a one-line CheckpointError. mmap: leave the tensors on disk (to read the metadata only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass ckpt_path=/path/to/best.ckpt")
    damaged = f"checkpoint {path} is damaged or not a PyTorch checkpoint; pass a .ckpt written by train.py"
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(damaged)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"checkpoint {path} holds pickled objects{what} that safe loading refuses, since "
                              "they could run code; only load checkpoints written by train.py") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{damaged} ({type(error).__name__})") from None
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not an animal-lightning checkpoint (no class names or preprocessing "
                              "inside); pass a .ckpt written by train.py")
    return checkpoint, meta


def check_resumable(path: str | os.PathLike, model) -> None:
    """Resuming `path` into `model` must find the same classes and backbone; say so in one line if not
    (instead of Lightning's state-dict traceback)."""
    checkpoint, meta = read_checkpoint(path, mmap=True)
    saved_classes, backbone = list(meta.get("class_names") or []), checkpoint["hyper_parameters"].get("backbone")
    if backbone != model.hparams.backbone:
        raise CheckpointError(f"checkpoint {path} holds a {backbone} and this run builds a {model.hparams.backbone}: "
                              f"pass model=... for {backbone} to resume it, or drop ckpt_path to start afresh")
    if saved_classes != model.class_names:
        def preview(names: list[str]) -> str:
            return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

        raise CheckpointError(f"checkpoint {path} was trained on {len(saved_classes)} classes "
                              f"({preview(saved_classes)}) and this run's data has {len(model.class_names)} "
                              f"({preview(model.class_names)}): "
                              "resume with the data it was trained on, or drop ckpt_path to start afresh")
    saved, own = checkpoint["state_dict"], model.state_dict()
    differences = [f"{k} is not in the checkpoint" for k in own if k not in saved] + \
        [f"{k} is only in the checkpoint" for k in saved if k not in own] + \
        [f"{k} is {tuple(saved[k].shape)} there and {tuple(own[k].shape)} here" for k in own
         if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if differences:  # e.g. attributes switched on or off, another attribute count, another ViT input size
        imagenet = any(k.startswith("imagenet_") for k in [*own, *saved] if (k in own) != (k in saved))
        kept = "head" if "imagenet_weight" in saved else "copy" if any(k.startswith("imagenet_net.") for k in saved) \
            else "none"
        setting = f"model.imagenet_knowledge={kept}" if imagenet else "the settings it was trained with"
        raise CheckpointError(f"checkpoint {path} does not fit this run's model ({differences[0]}; "
                              f"{len(differences)} difference(s)): resume with {setting}, "
                              "or drop ckpt_path to start afresh")



# -- the random streams ---------------------------------------------------------------------------------
def rng_states() -> dict:
    """torch's, numpy's and Python's global random states as tensors and plain numbers (what
    torch.load(weights_only=True) reads back)."""
    version, state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()  # dropout and drop-path on the GPU draw from these
    return states


def set_rng_states(states: dict) -> None:
    """Put back what rng_states() saved."""
    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
