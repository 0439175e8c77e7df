"""The README's picture of app.py: start the page on a checkpoint, drop a photo on it in headless Chromium, and
save the page with its answer and Grad-CAM.

    python scripts/app_screenshot.py [--ckpt best] [--photo data/.../test/0000.jpg] [--out docs/app.png]

Needs Debian's chromium (apt-get install chromium) and Playwright (in the dev extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="best", help="app.py's ckpt_path (default: the newest run's best)")
    parser.add_argument("--photo", type=Path, help="the photo to drop (default: the page's first example)")
    parser.add_argument("--out", type=Path, default=PROJECT / "docs" / "app.png")
    parser.add_argument("--browser", default="/usr/bin/chromium")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(PROJECT / "app.py"), f"ckpt_path={args.ckpt}", f"port={port}"],
                              cwd=PROJECT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"app.py stopped with {server.returncode}") from None
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.browser, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle")
            if args.photo:
                page.locator("#photo input[type=file]").set_input_files(str(args.photo))
            else:
                page.locator(".gallery-item, button.gallery-item, [data-testid='example']").first.click()
            page.locator("#verdict h2").wait_for(timeout=60_000)
            page.locator("#gradcam img").wait_for(timeout=60_000)
            page.wait_for_timeout(500)  # the bars' transition
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            print(f"{args.out}: {page.locator('#verdict h2').inner_text()}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
