"""Real test peers for cpvm's integration tests: QEMU, TigerVNC's Xvnc, PostgreSQL, Chromium.

Each ``start_*`` helper starts one real server on 127.0.0.1, waits for it with a bounded poll
(the 12-byte RFB banner, or ``pg_isready``), checks that the listening socket really belongs
to the process it started, and returns a :class:`Peer` with ``.host``, ``.port``, ``.pid`` and
``.stop()``; peers are context managers too. Nothing outlives the test run (see
:mod:`tests.peers.processes`).

One module per kind of peer — :mod:`.processes` (supervision, ``Peer``), :mod:`.readiness`
(ports, bounded polls), :mod:`.qemu`, :mod:`.xvnc`, :mod:`.postgres`, :mod:`.pki`,
:mod:`.chromium` — and everything public is importable from here (``from tests.peers import
start_qemu``). This package is plain Python (no pytest) so benchmarks and scripts can use it
as well. A missing binary raises :class:`PeerUnavailable`, whose message says to run
``scripts/install-deps``.
"""

from __future__ import annotations

from tests.peers.chromium import CHROMIUM_ARGS, CHROMIUM_PATH, launch_chromium
from tests.peers.pki import TestPki, make_test_ca
from tests.peers.postgres import Postgres, start_postgres
from tests.peers.processes import (
    HOST,
    INSTALL_HINT,
    PEER_LIFETIME_SECONDS,
    REPO_ROOT,
    Peer,
    PeerStartError,
    PeerUnavailable,
    Supervised,
    deadline,
    make_workdir,
    require_binary,
    write_private,
)
from tests.peers.qemu import (
    GUEST_READY_MARKER,
    QEMU_TEST_PASSWORD,
    QemuVnc,
    build_demo_guest,
    demo_guest_paths,
    start_qemu,
)
from tests.peers.readiness import free_port, pid_listens_on, wait_for_file_text, wait_for_rfb_banner
from tests.peers.xvnc import XVNC_TEST_PASSWORD, Xvnc, start_xvnc

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "PEER_LIFETIME_SECONDS",
    "REPO_ROOT",
    "QEMU_TEST_PASSWORD",
    "XVNC_TEST_PASSWORD",
    "GUEST_READY_MARKER",
    "PeerUnavailable",
    "PeerStartError",
    "Peer",
    "Supervised",
    "QemuVnc",
    "Xvnc",
    "Postgres",
    "TestPki",
    "deadline",
    "free_port",
    "make_workdir",
    "pid_listens_on",
    "wait_for_rfb_banner",
    "wait_for_file_text",
    "write_private",
    "require_binary",
    "start_qemu",
    "start_xvnc",
    "start_postgres",
    "make_test_ca",
    "demo_guest_paths",
    "build_demo_guest",
    "launch_chromium",
    "CHROMIUM_PATH",
    "CHROMIUM_ARGS",
]
