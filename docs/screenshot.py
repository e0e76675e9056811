"""Makes docs/report.png, the README's picture of the report, from a real `cnnlab reproduce` run:

    .venv/bin/cnnlab reproduce --data-root ../shared/data --model efficientnet_lite0 --out runs/reproduce
    .venv/bin/python docs/screenshot.py runs/reproduce/report.html

It opens the report from disk in headless Chromium (Debian's package, as `setup.sh test` installs it)
and saves the first screen, 1280x900.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().with_name("report.png")


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python docs/screenshot.py REPORT.html (a report written by cnnlab reproduce)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("docs/screenshot.py: no chromium on the PATH; apt-get install chromium (or bash setup.sh test)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(Path(sys.argv[1]).resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(OUT), full_page=False)
        browser.close()
    print(OUT)


if __name__ == "__main__":
    main()
