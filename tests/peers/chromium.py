"""Debian's Chromium, launched through Playwright for the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tests.peers.processes import INSTALL_HINT, PeerUnavailable

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def launch_chromium(playwright: Any, *, headless: bool = True, args: Sequence[str] = ()) -> Any:
    """Launch Debian's ``/usr/bin/chromium`` through Playwright (never ``playwright install``).

    *playwright* is the object from ``sync_playwright().start()`` (returns a ``Browser``) or
    ``async_playwright()`` (returns an awaitable of one). Playwright gives each launch a
    fresh temporary profile (user data dir) and deletes it on ``browser.close()``; it refuses
    a ``--user-data-dir`` argument on ``launch``.
    """
    if not os.access(CHROMIUM_PATH, os.X_OK):
        raise PeerUnavailable(f"{CHROMIUM_PATH} not found: {INSTALL_HINT}")
    flags = [flag for flag in CHROMIUM_ARGS if headless or flag != "--headless"]
    return playwright.chromium.launch(
        executable_path=CHROMIUM_PATH,
        headless=headless,
        args=[*flags, *args],
        chromium_sandbox=False,
        timeout=60_000,
    )
