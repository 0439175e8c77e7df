"""From app.py's config to a served page: the checkpoint loaded once, examples prepared, then Gradio.

The run's folder (logs/app/runs/<time>/) keeps the example photos and Hydra's log; uploads and each
request's files (predictions, overlays, unpacked zips) go to a temporary folder of this server, removed when
it stops. No folder is added to Gradio's allowed paths: the page serves what its handlers return (copied
into that temporary folder, Gradio's cache), not a folder of files other users' requests left.
The checkpoint is loaded before Gradio is imported, so a missing or foreign checkpoint stops app.py with
predict.py's one-line error at once.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from animal_lightning.app.service import DemoModel
from animal_lightning.app.uploads import UploadLimits
from animal_lightning.checkpoints import resolve_checkpoint
from animal_lightning.data.images import image_problem, is_image_name
from animal_lightning.errors import DataError
from animal_lightning.prediction import PredictOptions

log = logging.getLogger(__name__)


def load_service(cfg, workdir: Path, limits: UploadLimits) -> DemoModel:
    """The DemoModel of cfg.ckpt_path (best/last of the newest run, or a path), with predict.py's options; its
    requests write into `workdir`."""
    checkpoint = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir)
    options = PredictOptions.from_config(cfg)
    options.progress = False  # the page shows its own progress
    return DemoModel(checkpoint, options, workdir, limits)


def app_limits(cfg) -> UploadLimits:
    limits = UploadLimits(max_upload_mb=float(cfg.max_upload_mb), max_unpacked_mb=float(cfg.max_unpacked_mb),
                          max_files=int(cfg.max_files))
    for name in ("max_upload_mb", "max_unpacked_mb", "max_files"):
        if getattr(limits, name) <= 0:
            raise DataError(f"{name}={getattr(limits, name):g} must be above 0 (conf/app.yaml)")
    return limits


def example_photos(cfg, service: DemoModel, run_dir: Path) -> list[Path]:
    """`examples=<folder>`, or the training data's test/ folder: its first photos, copied into the run folder."""
    source = cfg.get("examples")
    if source is not None:
        source = Path(str(source)).expanduser()
        if not source.is_dir():
            raise DataError(f"examples={source} is not a folder: pass a folder of photos, or examples=null")
    elif service.meta.get("data_root"):
        source = Path(service.meta["data_root"]) / "test"
    return copy_examples(source, run_dir / "examples", int(cfg.max_examples))


def copy_examples(source: Path | None, target: Path, limit: int) -> list[Path]:
    """Up to `limit` readable photos of `source` (sorted by name), copied into `target`."""
    if source is None or not source.is_dir():
        return []
    chosen = []
    for path in sorted(p for p in source.iterdir() if p.is_file() and is_image_name(p.name)):
        if len(chosen) >= limit:
            break
        if image_problem(path) is None:
            chosen.append(path)
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(path, target / path.name)) for path in chosen]


def run_app(cfg) -> None:
    """Load the model, then serve the page at cfg.host:cfg.port until stopped."""
    run_dir = Path(cfg.paths.output_dir)
    limits = app_limits(cfg)  # before anything is loaded
    uploads = Path(tempfile.mkdtemp(prefix="animal-lightning-app-"))
    atexit.register(shutil.rmtree, uploads, ignore_errors=True)
    service = load_service(cfg, uploads / "requests", limits)
    print(f"Checkpoint: {service.checkpoint}", flush=True)
    examples = example_photos(cfg, service, run_dir)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop from a service manager is a Ctrl-C:
        # Gradio closes the server and the temporary folder is removed on the way out
    print(f"Temporary folder: {uploads} (uploads and each request's files; removed when the server stops)",
          flush=True)
    from animal_lightning.app import page as pages

    pages.use_temporary_folder(uploads)
    page = pages.build_page(service, examples)
    page.queue()  # every event is in one concurrency group of one (page.py): requests wait for the model
    if str(cfg.host) not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this machine can use the page (no login)", cfg.host)
    page.launch(server_name=str(cfg.host), server_port=int(cfg.port),
                max_file_size=f"{int(float(cfg.max_upload_mb) * 1024)}kb",
                show_error=True, ssr_mode=False, quiet=False, theme=page.theme, mcp_server=False, inbrowser=False)
