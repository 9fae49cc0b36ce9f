"""A real headless browser for the admin page's tests: Debian's chromium driven through its
own chromedriver, both found by path (selenium never downloads a driver). Installed with
apt-get when missing and the tests run as root; otherwise the tests skip, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """Why there is no browser to test with, or None when there is one."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        installed = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
            capture_output=True, text=True, timeout=600)
        if CHROMIUM.exists() and CHROMEDRIVER.exists():
            return None
        return f"chromium could not be installed: {installed.stderr.strip()[-300:]}"
    return "chromium and chromium-driver are not installed (apt-get install chromium " \
           "chromium-driver), and the tests are not root to install them"


def start_chromium() -> object:
    """A headless Chromium session (a selenium WebDriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    # An explicit driver path: selenium's own driver manager is never asked to fetch one
    # (and, offline, would not fetch one if it were).
    os.environ.setdefault("SE_OFFLINE", "true")
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(240)
    return driver
