"""Shared pytest fixtures: real test peers from :mod:`tests.peers`.

A peer that cannot be started because something is not installed makes the test *fail*
(never skip) with a message saying to run ``scripts/install-deps``: a green run means the
tests really ran against QEMU, TigerVNC and PostgreSQL.

Fixtures:
  pki              (session)  TestPki: CA + server leaf for 127.0.0.1/localhost
  qemu_vnc         (function) QEMU, VNC password QEMU_TEST_PASSWORD ("qemupw1"), type 2
  qemu_vnc_tls     (function) same plus VeNCrypt X509 with ``pki`` (type 19, subtype 261)
  xvnc             (function) Xvnc, VncAuth, password XVNC_TEST_PASSWORD ("secret")
  xvnc_x509        (function) Xvnc, VeNCrypt X509Vnc with ``pki``, password "secret"
  postgres         (session)  Postgres with database cpvm_test (``.dsn``)
  demo_guest       (session)  (vmlinuz, initrd.gz) from scripts/build-demo-guest
  qemu_guest       (function) QEMU booting the demo guest, password "qemupw1",
                              serial log in tmp_path (``.serial_log``, ``.wait_for_serial``)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests import peers

T = TypeVar("T")


def _start(factory: Callable[[], T]) -> T:
    """Start a peer; turn "not installed" into a test failure that says what to do."""
    try:
        return factory()
    except peers.PeerUnavailable as exc:
        message = str(exc)
    pytest.fail(f"test peer unavailable: {message}", pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/integration as ``integration`` (select with -m)."""
    integration_dir = Path(__file__).parent / "integration"
    for item in items:
        if integration_dir in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> peers.TestPki:
    """A test CA with a server certificate for 127.0.0.1 and localhost."""
    return _start(lambda: peers.make_test_ca(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def qemu_vnc() -> Iterator[peers.QemuVnc]:
    """QEMU whose VNC server asks for VNC Authentication with password "qemupw1"."""
    with _start(lambda: peers.start_qemu(peers.QEMU_TEST_PASSWORD)) as qemu:
        yield qemu


@pytest.fixture
def qemu_vnc_tls(pki: peers.TestPki) -> Iterator[peers.QemuVnc]:
    """QEMU offering VeNCrypt X509Vnc (cert from ``pki``), password "qemupw1"."""
    with _start(lambda: peers.start_qemu(peers.QEMU_TEST_PASSWORD, tls_dir=pki.dir)) as qemu:
        yield qemu


@pytest.fixture
def xvnc() -> Iterator[peers.Xvnc]:
    """TigerVNC Xvnc with VncAuth, password "secret"; ``.run_xterm()`` puts a window up."""
    with _start(lambda: peers.start_xvnc("VncAuth", peers.XVNC_TEST_PASSWORD)) as server:
        yield server


@pytest.fixture
def xvnc_x509(pki: peers.TestPki) -> Iterator[peers.Xvnc]:
    """TigerVNC Xvnc offering only VeNCrypt (19) / X509Vnc (261), cert from ``pki``, "secret"."""
    with _start(
        lambda: peers.start_xvnc(
            "X509Vnc",
            peers.XVNC_TEST_PASSWORD,
            x509=(pki.server_cert, pki.server_key),
        )
    ) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Postgres]:
    """A PostgreSQL server for the whole run; ``.dsn`` points at the empty ``cpvm_test``.

    Tests that need a clean database call ``postgres.create_database("unique_name")``.
    """
    with _start(lambda: peers.start_postgres(tmp_path_factory.mktemp("postgres"))) as server:
        yield server


@pytest.fixture(scope="session")
def demo_guest() -> tuple[Path, Path]:
    """``(vmlinuz, initrd.gz)`` of the demo guest (built on first use, then cached)."""
    return _start(peers.build_demo_guest)


@pytest.fixture
def qemu_guest(demo_guest: tuple[Path, Path], tmp_path: Path) -> Iterator[peers.QemuVnc]:
    """QEMU booting the demo guest (shell on the VGA console), VNC password "qemupw1".

    The guest's ttyS0 goes to ``.serial_log``; ``.wait_for_serial(peers.GUEST_READY_MARKER)``
    returns once the shell runs (~5 s). Type ``echo abc123 >/dev/ttyS0`` + Enter through the
    console and wait for ``abc123`` in the serial log to prove keys reached the guest.
    """
    serial_log = tmp_path / "guest-serial.log"
    with _start(
        lambda: peers.start_qemu(peers.QEMU_TEST_PASSWORD, guest=demo_guest, serial_log=serial_log)
    ) as qemu:
        yield qemu
