"""The main job: compose data, model and Trainer from the config, fit, test the best checkpoint, report.

`train(cfg)` is what `python train.py` runs; it takes a composed config (Hydra's or one built by
`hydra.compose` in a test) and returns the final metrics, with val/acc_best for sweepers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from animal_lightning.atomic import AtomicCheckpointIO, write_text_atomic
from animal_lightning.checkpoints import (
    check_resumable,
    last_checkpoint,
    last_checkpoint_in,
    read_checkpoint,
    resolve_checkpoint,
)
from animal_lightning.data import AnimalDataModule
from animal_lightning.errors import AnimalLightningError, ModelConfigError
from animal_lightning.hardware import auto_precision
from animal_lightning.models import AnimalClassifier
from animal_lightning.preemption import Preempted
from animal_lightning.quiet import quiet_lightning

log = logging.getLogger(__name__)

# The metrics TensorBoard's HParams view shows against each run's hyperparameters (their final values).
HPARAMS_METRICS = {"val/acc_best": "hp/val_acc_best", "test/acc": "hp/test_acc", "test/acc_macro": "hp/test_acc_macro"}


def instantiate_checked(config, **kwargs):
    """hydra.utils.instantiate, but our own one-line errors come out unwrapped (Hydra buries them)."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, AnimalLightningError):
            raise error.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None, kind: type) -> list:
    """Instantiate every entry of a callbacks/logger group that has a _target_ (null entries are off)."""
    objects = []
    for name, entry in (group or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            obj = instantiate_checked(entry)
            if not isinstance(obj, kind):
                raise ModelConfigError(f"config entry {name} made a {type(obj).__name__}, not a {kind.__name__}")
            objects.append(obj)
    return objects


def _plain(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    values = {}
    for name, value in metrics.items():
        if name.startswith(prefix):
            number = float(value.item() if isinstance(value, torch.Tensor) else value)
            values[name] = number if math.isfinite(number) else None
    return dict(sorted(values.items()))


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> L.Trainer:
    """The Trainer of cfg.trainer, built once: precision and DDP strategy settled from the config first."""
    quiet_lightning()
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("precision") == "auto":
        trainer_cfg["precision"] = auto_precision(str(trainer_cfg.get("accelerator", "auto")))
    freezes = int(cfg.model.get("freeze_backbone_epochs") or 0) > 0
    trainer_cfg["strategy"] = ddp_strategy(trainer_cfg, freezes)
    return _atomic_checkpoints(instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False))


FIND_UNUSED = ("_find_unused_parameters_true", "_find_unused_parameters_false")  # strategy name suffixes


def ddp_strategy(trainer_cfg: dict, freezes: bool):
    """trainer.strategy, adjusted where DDP needs it (a strategy object from the config stays as it is).

    DDP is chosen by name (ddp...) or, with strategy auto, by more than one process (devices x num_nodes), as
    Lightning would. Lightning's ddp starts the other ranks by re-running the command line: under -m that is
    the whole sweep again, in every child, so a sweep job starts them itself (ddp_spawn), unless a cluster
    (SLURM, torchrun, LSF, MPI) already started one process per rank. A frozen backbone leaves parameters without
    gradients, which DDP must be told to expect (find_unused_parameters)."""
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str):
        return strategy
    if strategy == "auto" and _processes(trainer_cfg) > 1:
        strategy = "ddp"
    if not strategy.startswith("ddp"):
        return strategy
    suffix = next((suffix for suffix in FIND_UNUSED if strategy.endswith(suffix)), "")
    base = strategy[: len(strategy) - len(suffix)]
    if base == "ddp" and _in_multirun() and not _cluster_starts_ranks():
        base = "ddp_spawn"
        log.info("multirun: DDP starts its processes with %s (ddp would re-run the sweep in each rank)", base)
    return base + (FIND_UNUSED[0] if freezes else suffix)


def _processes(trainer_cfg: dict) -> int:
    """How many processes the Trainer config asks for (devices x num_nodes), resolved as Lightning does."""
    accelerator, devices = str(trainer_cfg.get("accelerator", "auto")), trainer_cfg.get("devices", "auto")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if devices in ("auto", -1, "-1"):
        count = torch.cuda.device_count() if gpu else 1
    elif isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([part for part in devices.split(",") if part.strip()])
    else:
        count = int(devices)
    return max(1, count) * int(trainer_cfg.get("num_nodes", 1) or 1)


def _atomic_checkpoints(trainer: L.Trainer) -> L.Trainer:
    """Checkpoints written beside their target and renamed into place, unless a plugin chose another writer."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def _cluster_starts_ranks() -> bool:
    """A cluster already started one process per rank (SLURM's srun tasks, torchrun, LSF, MPI): DDP must not
    launch any. These are Lightning's cluster environments that create processes externally and can be detected
    (Kubeflow's cannot: there the plugin is named in the trainer config, and the strategy is left as it is)."""
    from lightning.fabric.plugins import environments

    clusters = (environments.SLURMEnvironment, environments.TorchElasticEnvironment, environments.LSFEnvironment,
                environments.MPIEnvironment)
    return any(cluster.detect() for cluster in clusters)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_model(cfg: DictConfig, datamodule: AnimalDataModule) -> AnimalClassifier:
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate_checked(cfg.model, class_names=datamodule.class_names, class_weights=datamodule.loss_weights(),
                               attributes=datamodule.attribute_hparams(), resize_mode=datamodule.resize_mode,
                               **datamodule.zero_shot_hparams(), optimizer=optimizer, scheduler=scheduler)


def resume_in_run_folder(cfg: DictConfig) -> None:
    """Pick the checkpoint to resume from, and continue in its run folder.

    `ckpt_path=last` is the newest run's checkpoints/last.ckpt. Without ckpt_path, a run folder that
    already holds checkpoints/last.ckpt (a requeued cluster job, or a rerun with a fixed hydra.run.dir)
    continues from it (`auto_resume`). Resuming from <run>/checkpoints/*.ckpt continues in <run>: its
    best.ckpt and best score stay valid. In a new folder Lightning's ModelCheckpoint would forget the best
    score (it only trusts its own folder), so the first epoch after resuming would become "best" however bad.
    """
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        last = last_checkpoint_in(Path(cfg.paths.output_dir) / "checkpoints")
        if cfg.get("auto_resume", True) and last.is_file():
            log.info("%s exists: resuming from it (auto_resume=false starts afresh)", last)
            print(f"Resuming from {last} (this run folder's own last checkpoint)", flush=True)
            cfg.ckpt_path = str(last)
        return
    if ckpt == "last":
        cfg.ckpt_path = ckpt = str(resolve_checkpoint("last", cfg.paths.log_dir))
        print(f"Resuming from {ckpt} (the newest run's last checkpoint)", flush=True)
    ckpt = Path(ckpt).expanduser()
    if not ckpt.is_file():
        raise ModelConfigError(f"ckpt_path={ckpt} not found: pass ckpt_path=last or the run's "
                               "checkpoints/last.ckpt to resume")
    if ckpt.parent.name == "checkpoints" and cfg.get("resume_in_place", True):
        run_dir = ckpt.resolve().parent.parent
        log.info("resuming %s: continuing in its run folder %s", ckpt, run_dir)
        cfg.paths.output_dir = str(run_dir)


def tune(options: DictConfig, trainer: L.Trainer, model: AnimalClassifier, datamodule: AnimalDataModule,
         output_dir: Path) -> None:
    """Lightning's tuner before fitting: the largest batch that fits (GPU), then the learning-rate finder."""
    from lightning.pytorch.tuner import Tuner

    tuner = Tuner(trainer)
    if options.get("batch_size"):
        if not isinstance(trainer.accelerator, L.accelerators.CUDAAccelerator):
            raise ModelConfigError("tune.batch_size=true needs a GPU: it grows the batch until GPU memory runs out; "
                                   "on the CPU set data.batch_size yourself")
        found = tuner.scale_batch_size(model, datamodule=datamodule, mode="power",
                                       max_trials=int(options.get("max_batch_trials", 6)))
        log.info("batch size finder: data.batch_size=%s", found)
        print(f"Batch size finder: training with data.batch_size={found}", flush=True)
    if options.get("lr_find"):
        finder = tuner.lr_find(model, datamodule=datamodule, update_attr=False,
                               num_training=int(options.get("lr_find_steps", 100)))
        suggestion = finder.suggestion() if finder is not None else None
        if suggestion is None:
            print("Learning-rate finder: no suggestion (loss did not fall); keeping optimizer.lr", flush=True)
            return
        figure = finder.plot(suggest=True)
        figure.savefig(output_dir / "lr_find.png", dpi=100)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_figure"):
                logger.experiment.add_figure("tune/lr_find", figure)
        # the optimizer config with lr replaced (a call's keywords override a partial's own)
        model.optimizer_factory = functools.partial(model.optimizer_factory, lr=float(suggestion))
        print(f"Learning-rate finder: training with optimizer.lr={suggestion:.3g} (plot: {output_dir / 'lr_find.png'})",
              flush=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then test the best checkpoint; write metrics.json into the run folder and return the metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    resume_in_run_folder(cfg)
    output_dir = Path(cfg.paths.output_dir)

    datamodule: AnimalDataModule = instantiate_checked(cfg.data)
    model = build_model(cfg, datamodule)  # reading class_names scans and checks the data once, here
    if cfg.get("ckpt_path"):
        check_resumable(cfg.ckpt_path, model)  # safe to load, and the same classes and backbone
    datamodule.use_preprocess(model.preprocess)  # the model's spec (with data.resize_mode): one computation
    callbacks = instantiate_group(cfg.get("callbacks"), Callback)
    loggers = instantiate_group(cfg.get("logger"), Logger)
    trainer = build_trainer(cfg, callbacks, loggers)
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:  # TensorBoard's HParams entry is written at the end, with the results it shows
        logger.log_hyperparams(hyperparameters)
    log.info("precision %s, %d classes, preprocessing %s", trainer.precision, len(model.class_names),
             model.preprocess)

    if cfg.get("tune") and not cfg.get("ckpt_path"):
        tune(cfg.tune, trainer, model, datamodule, output_dir)
    with _sigterm_exits_143(trainer):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    val_metrics = _plain(trainer.callback_metrics, "val/")

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        # Restoring best.ckpt with Lightning's weight-averaging callback still attached would put the raw weights
        # back; test the averaged ones, which validation scored and the checkpoint holds (as prediction does).
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
        with _sigterm_exits_143(trainer):
            trainer.test(model=model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        test_metrics = _plain(trainer.callback_metrics, "test/")

    results = {**val_metrics, **test_metrics}
    final = {tag: results[name] for name, tag in HPARAMS_METRICS.items() if results.get(name) is not None}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger) and final:
            # the HParams view: this run's settings against its final results, one point each (no placeholder
            # 0 at the start, which would draw a line from 0 to the result)
            logger.log_hyperparams(hyperparameters, metrics=final, step=max(1, trainer.global_step))
            logger.experiment.flush()  # trainer.test has closed the logger already
    summary = {
        "val": val_metrics,
        "test": test_metrics,
        "test_source": datamodule.index.test_source,
        "best_checkpoint": best,
        "last_checkpoint": last_checkpoint(checkpoint),
        "epochs_completed": _epochs_completed(trainer, checkpoint),
        "class_names": model.class_names,
        "unusable_images": dict(sorted(datamodule.index.bad_images.items())),  # left out, with the reason
        "excluded_images": datamodule.index.excluded,  # left out by data.exclude
        "exclude_unmatched": datamodule.index.exclude_unmatched,  # data.exclude lines that matched no file
        "run_dir": str(output_dir),
    }
    if model.unseen_class_names:  # what each zero-shot candidate was matched to, and what the test named it by
        summary["zero_shot"] = {"sources": model.hparams.zero_shot_sources,
                                "imagenet_map": datamodule.imagenet_matches_described(),
                                "test_per_class": model.zero_shot_table}
    if trainer.is_global_zero:
        write_text_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        report(summary)
    return {**val_metrics, **test_metrics, "best_checkpoint": best}


@contextlib.contextmanager
def _sigterm_exits_143(trainer: L.Trainer):
    """Lightning's own SIGTERM handling (in testing, or in training without callbacks.preemption) stops with
    a SystemExit of status 0, which a scheduler reads as success; exit as SIGTERM would (143) instead, saying
    which checkpoint the run resumes from."""
    try:
        yield
    except SIGTERMException:
        last = last_checkpoint(trainer.checkpoint_callback)
        stopped = Preempted(signal.SIGTERM, Path(last) if last else None, saved=False)
        print(f"Preempted: {stopped}", flush=True)
        raise stopped from None


def _epochs_completed(trainer: L.Trainer, checkpoint) -> int:
    """The trainer's count; after ddp_spawn (whose ranks trained in child processes, leaving this process's
    loop at 0) the last checkpoint's epoch."""
    last = last_checkpoint(checkpoint)
    if trainer.current_epoch or last is None:
        return trainer.current_epoch
    # mmap: only the epoch is read, not the weights and optimizer state
    return int(read_checkpoint(last, mmap=True)[0].get("epoch", -1)) + 1


def report(summary: dict) -> None:
    """The lines a user reads at the end of a run: the numbers and where the model is."""
    lines = ["", "Results"]
    for split in ("val", "test"):
        for name, value in summary[split].items():
            lines.append(f"  {name:<18} {value:.4f}" if value is not None else f"  {name:<18} n/a")
    lines.append(f"  test set: {summary['test_source']}")
    lines.append(f"Best checkpoint: {summary['best_checkpoint']}")
    lines.append(f"Run folder:      {summary['run_dir']}")
    print("\n".join(lines), flush=True)
