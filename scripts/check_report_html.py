#!/usr/bin/env python
"""Render a trigscan report.html in headless Chromium and check that it shows.

    python scripts/check_report_html.py DIR/report.html [--png shot.png] [--width 1100] [--height 1400]

Needs Debian's chromium (``apt-get install -y chromium``; or --chromium PATH).
The page is opened from disk with the network off (the report is one
self-contained file: images are data URIs), a screenshot is written, and the
screenshot is checked for the report's own colours: the verdict banner
(red or green) and the summary figure's bars, which only appear if the inline
PNGs decoded. Exit 0 when both are there, 1 otherwise.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

# colours the report draws (trigscan/report.py): verdict banners and summary bars
BANNERS = {"backdoored": (0xfd, 0xe0, 0xe0), "clean": (0xe3, 0xf3, 0xe4)}
BARS = [(0x4a, 0x78, 0xb5), (0xd3, 0x2f, 0x2f)]


def screenshot(html: Path, png: Path, width: int, height: int, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.exists():
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}")


def count(image: Image.Image, colour) -> int:
    """Pixels within a small tolerance of `colour`."""
    rgb = image.convert("RGB")
    return sum(n for n, c in rgb.getcolors(rgb.width * rgb.height)
               if all(abs(a - b) <= 3 for a, b in zip(c, colour)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--png", type=Path, help="screenshot path (default: beside the report)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    if not args.html.is_file():
        raise SystemExit(f"{args.html}: no such file")
    png = args.png or args.html.with_name("report_screenshot.png")
    screenshot(args.html, png, args.width, args.height, args.chromium)
    image = Image.open(png)
    banner = {name: count(image, colour) for name, colour in BANNERS.items()}
    bars = sum(count(image, colour) for colour in BARS)
    print(f"{png}: {image.width}x{image.height}; banner pixels {banner}; summary bar pixels {bars}")
    ok = max(banner.values()) > 500 and bars > 500
    print("rendered: verdict banner and inline summary figure visible" if ok else
          "NOT rendered as expected (banner or inline figure missing)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
