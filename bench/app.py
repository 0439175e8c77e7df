"""The page against predict.py on the same photos: how long a user waits for an answer.

Starts `python app.py` on a checkpoint (a free localhost port), then in one run:
- one photo, `--repeats` times through the page's API (/photo: top-5, decisions and the Grad-CAM of the top
  class), against `python predict.py input=<photo> gradcam=true` as a new process each time (its start-up,
  the checkpoint load and the same work);
- a folder (`--folder`, default: the checkpoint's test folder) through /folder, against `python predict.py
  input=<folder>`; each answer's class is compared between the two.
Both in the same precision (predict.py's default, auto). Prints JSON, then a one-line summary. Needs the app
extra (gradio, gradio_client).

    python bench/app.py [--ckpt best] [--folder data/synthetic/<spec>/test] [--repeats 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from animal_lightning.checkpoints import read_checkpoint, resolve_checkpoint
from animal_lightning.data.images import is_image_name
from animal_lightning.hardware import cpu_description

PROJECT = Path(__file__).resolve().parents[1]


def predict_py(work: Path, ckpt: Path, source: Path, *overrides: str) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(PROJECT / "predict.py"), f"ckpt_path={ckpt}", f"input={source}",
                    f"paths.root_dir={work}", "progress=false", f"output={work / 'out' / 'predictions.csv'}",
                    *overrides], cwd=work, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    with (work / "out" / "predictions.csv").open(newline="") as handle:
        return seconds, list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="best")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    ckpt = resolve_checkpoint(args.ckpt, PROJECT / "logs")
    _, meta = read_checkpoint(ckpt, mmap=True)
    folder = args.folder or Path(meta["data_root"]) / "test"
    photos = sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name))
    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(PROJECT / "app.py"), f"ckpt_path={ckpt}", f"port={port}",
                               f"paths.root_dir={work}"], cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": tempfile.gettempdir()})
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 300:
                    raise SystemExit("app.py did not start") from None
                time.sleep(0.2)
        startup = time.perf_counter() - start
        client = Client(url, verbose=False, download_files=str(work / "downloads"))
        photo = photos[0]
        page_photo, process_photo = [], []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            answer = client.predict(handle_file(str(photo)), api_name="/photo")[4]
            page_photo.append(time.perf_counter() - begin)
            seconds, rows = predict_py(work, ckpt, photo, "gradcam=true")
            process_photo.append(seconds)
            assert rows[0]["class"] == answer["answer"], (rows[0], answer["answer"])
        begin = time.perf_counter()
        table = client.predict([handle_file(str(p)) for p in photos], api_name="/folder")[1]["value"]
        page_folder = time.perf_counter() - begin
        process_folder, rows = predict_py(work, ckpt, folder)
        page_classes = {row[0]: row[1] for row in table["data"]}
        agree = sum(page_classes.get(row["image_id"]) == row["class"] for row in rows)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"benchmark": "app", "cpu": cpu_description(), "checkpoint": str(ckpt), "backbone": meta.get("backbone"),
              "app_startup_s": round(startup, 2), "photo": photo.name, "repeats": args.repeats,
              "page_photo_s_median": round(statistics.median(page_photo), 3),
              "predict_py_photo_s_median": round(statistics.median(process_photo), 3),
              "folder_images": len(photos), "page_folder_s": round(page_folder, 2),
              "predict_py_folder_s": round(process_folder, 2), "folder_classes_agree": f"{agree}/{len(rows)}"}
    print(json.dumps(result, indent=1))
    print(f"app: one photo with Grad-CAM: page {result['page_photo_s_median']} s, predict.py "
          f"{result['predict_py_photo_s_median']} s (a new process); {len(photos)} photos: page "
          f"{result['page_folder_s']} s, predict.py {result['predict_py_folder_s']} s; classes agree "
          f"{result['folder_classes_agree']} ({result['cpu']})")


if __name__ == "__main__":
    main()
