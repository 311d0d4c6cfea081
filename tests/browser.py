"""Headless Chromium for tests and benchmarks: Debian's `chromium` and `chromium-driver` packages driven by Selenium.

Nothing is downloaded: the browser and driver paths are given explicitly (Selenium Manager is not consulted). Where
either is missing, `chromium_paths()` says which, and `require_chromium()` skips the test with that reason, except
under CI (`CI=true`, set by `.ci/run`, which installs them), where a missing browser FAILS the test: a CI run that
skipped its browser tests would prove nothing. Install them with `apt-get install -y chromium chromium-driver`.
"""

from __future__ import annotations

import os
import shutil

import pytest

BROWSER_CANDIDATES = ("chromium", "chromium-browser")
DRIVER_CANDIDATES = ("chromedriver",)


def chromium_paths() -> tuple[str | None, str | None, str]:
    """(browser path, driver path, reason) where reason says what is missing ("" when both are there).

    `CRANE_HF_CHROMIUM` / `CRANE_HF_CHROMEDRIVER` name other executables."""
    browser = os.environ.get("CRANE_HF_CHROMIUM") or next(filter(None, map(shutil.which, BROWSER_CANDIDATES)), None)
    driver = os.environ.get("CRANE_HF_CHROMEDRIVER") or next(filter(None, map(shutil.which, DRIVER_CANDIDATES)), None)
    missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver)) if not path]
    reason = ""
    if missing:
        install = "apt-get install -y chromium chromium-driver"
        reason = f"headless Chromium not installed ({' and '.join(missing)} missing: {install})"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            reason = "selenium is not installed (pip install -e '.[test]')"
    return browser, driver, reason


def in_ci() -> bool:
    """True under CI (the `CI` environment variable is "true", as `.ci/run` and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(reason: str) -> None:
    """Where `reason` names something missing: fail the calling test under CI, skip it elsewhere."""
    if not reason:
        return
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def require_chromium() -> None:
    """Skip the calling test where headless Chromium (or selenium) is missing; fail it under CI."""
    require(chromium_paths()[2])


def headless_chromium(width: int = 1400, height: int = 1000):
    """A Selenium Chrome driver on headless Chromium; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver, reason = chromium_paths()
    if reason:
        raise RuntimeError(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--allow-file-access-from-files",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def start_app(app, attempts: int = 3) -> int:
    """Launch Gradio Blocks on 127.0.0.1 at a free port without blocking; returns the port.

    Gradio checks that its page answers within 3 s and otherwise refuses to start; on a loaded machine that check can
    miss, so the launch is tried again (on a new port) up to `attempts` times."""
    from crane_hf.reporting.gradio_app import launch_options

    from .tiny_models import free_port

    for attempt in range(attempts):
        port = free_port()
        try:
            app.launch(
                server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options()
            )
            return port
        except ValueError:
            app.close()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
