"""The fuzz targets by name: ``TARGETS[name]`` is ``"module:function"``.

A target is a function of the raw fuzz input (bytes) that returns normally or raises
AssertionError when an invariant breaks; any exception escaping it is a finding. Each
target's seed and regression inputs are in ``tests/fuzz/corpus/<name>/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"

TARGETS: dict[str, str] = {
    # browser -> cpvm: the server-side RFB handshake (cpvm.rfb.RfbServerHandshake)
    "rfb_server": "tests.fuzz.rfb_targets:rfb_server",
    # browser -> cpvm after the handshake: the idle timer's cpvm.rfb.ClientInputScanner
    "rfb_input": "tests.fuzz.rfb_targets:rfb_input",
    # browser -> cpvm on a view-only console: cpvm.rfb.ViewOnlyFilter
    "rfb_viewonly": "tests.fuzz.rfb_targets:rfb_viewonly",
    # hostile VNC server -> cpvm: the client-side handshake (cpvm.rfb.RfbClientHandshake)
    "rfb_client": "tests.fuzz.rfb_targets:rfb_client",
    # public API query strings: parameters (cpvm.manager.public_api) and signatures (.signing)
    "api_signature": "tests.fuzz.api_targets:api_signature",
    # proxy API JSON bodies: redeem, heartbeat, end report (cpvm.manager.proxy_api)
    "proxy_bodies": "tests.fuzz.api_targets:proxy_bodies",
    # browser -> cpvm WebSocket frames: the fast path (cpvm.proxy.wsframes.FrameReader)
    "ws_frames": "tests.fuzz.ws_targets:ws_frames",
}

# What each target needs beyond its own module: without it the target is skipped.
REQUIRES: dict[str, str] = {"ws_frames": "cpvm.proxy.wsframes"}


class TargetUnavailable(Exception):
    """The code a target exercises is not there (e.g. a module not merged yet)."""


def load(name: str) -> Callable[[bytes], None]:
    """The target function ``name``; TargetUnavailable when what it tests cannot be imported."""
    module_name, _, function = TARGETS[name].partition(":")
    try:
        if name in REQUIRES:
            importlib.import_module(REQUIRES[name])
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TargetUnavailable(
            f"fuzz target {name} skipped: cannot import {e.name}: {e}"
        ) from None
    return getattr(module, function)


def corpus_files(name: str) -> list[Path]:
    """The committed seed and regression inputs of ``name``, sorted."""
    directory = CORPUS / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
