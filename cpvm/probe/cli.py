"""``cpvm-probe``: the command line, the credentials, and one run on its own reactor.

The API secret comes from a file (``--credentials``, the JSON that
``cpvm-manager-admin --json key create`` prints) or from the environment
(``CPVM_PROBE_API_KEY``, ``CPVM_PROBE_SECRET_KEY``), never from the command line, which
``ps`` and shell histories show to everyone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from cpvm.probe.api import ApiCredentials, create_console_endpoint
from cpvm.probe.legs import EXIT_INTERNAL, EXIT_USAGE, Leg, LegFailed, ProbeResult
from cpvm.probe.report import as_json, as_text, write_textfile

ENV_API_KEY = "CPVM_PROBE_API_KEY"
ENV_SECRET = "CPVM_PROBE_SECRET_KEY"


class UsageError(Exception):
    """Bad options or credentials: exit status 2, nothing was probed."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpvm-probe",
        description="Open one console end to end (API, WebSocket, RFB to the first screen "
        "update) and report each leg's time. Exit status: 0 healthy, 3 api, 4 upgrade, "
        "5 console (redemption and the VNC server's handshake), 6 first_update, "
        "2 usage, 1 internal error.",
    )
    p.add_argument(
        "--manager", required=True, help="the manager's base URL, e.g. http://127.0.0.1:8250"
    )
    p.add_argument(
        "--vm", required=True, help="the VM's UUID (the probe account must own it, or be admin)"
    )
    p.add_argument(
        "--credentials",
        type=Path,
        help=f"JSON file with apikey and secretkey (else ${ENV_API_KEY} and ${ENV_SECRET})",
    )
    p.add_argument(
        "--ca-file",
        type=Path,
        help="PEM CA(s) to verify the manager's and cpvm's certificates (default: the system's)",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds each leg may take (default 10)"
    )
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="what to print on stdout"
    )
    p.add_argument(
        "--textfile",
        type=Path,
        help="also write Prometheus metrics to this file (atomically), e.g. for node_exporter",
    )
    return p


def load_credentials(path: Path | None, environ: dict[str, str]) -> ApiCredentials:
    """The API key and secret from ``path`` or the environment."""
    if path is not None:
        try:
            data = json.loads(path.read_text())
            return ApiCredentials(str(data["apikey"]), str(data["secretkey"]))
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path}: expected JSON with apikey and secretkey") from None
    key, secret = environ.get(ENV_API_KEY), environ.get(ENV_SECRET)
    if not key or not secret:
        raise UsageError(f"give --credentials FILE, or set {ENV_API_KEY} and {ENV_SECRET}")
    return ApiCredentials(key, secret)


def _trust(ca_file: Path | None) -> tuple[Any, Any]:
    """The HTTPS policy toward the manager and the trust root toward cpvm."""
    from twisted.internet import ssl

    from cpvm.common.tls import manager_tls_policy, pem_certificates

    if ca_file is None:
        return manager_tls_policy(None), None
    try:
        policy = manager_tls_policy(ca_file)
        root = ssl.trustRootFromCertificates(pem_certificates(ca_file.read_bytes()))
    except Exception as e:
        raise UsageError(f"--ca-file {ca_file}: {e}") from None
    return policy, root


async def run(reactor: Any, args: argparse.Namespace, credentials: ApiCredentials) -> ProbeResult:
    """One probe: every leg in turn, until one fails."""
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    from cpvm.probe.websocket import probe_console

    policy, root = _trust(args.ca_file)
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
    result = ProbeResult(vm=args.vm)
    started = reactor.seconds()
    try:
        endpoint = await create_console_endpoint(
            http, reactor, args.manager, credentials, args.vm, timeout=args.timeout
        )
        result.seconds[Leg.API] = reactor.seconds() - started
        result.proxy = endpoint.where
        await probe_console(reactor, endpoint, result, timeout=args.timeout, trust_root=root)
    except LegFailed as failure:
        result.fail(failure)
    return result


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The console script; answers the exit status."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        credentials = load_credentials(args.credentials, dict(os.environ))
        if args.timeout <= 0:
            raise UsageError("--timeout must be more than 0")
        _trust(args.ca_file)
    except UsageError as e:
        print(f"cpvm-probe: {e}", file=sys.stderr)
        return EXIT_USAGE

    from twisted.internet import defer
    from twisted.internet import reactor as default_reactor

    results: list[ProbeResult] = []

    async def once_async(reactor: Any) -> None:
        results.append(await run(reactor, args, credentials))

    def once(reactor: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(once_async(reactor))

    from twisted.internet.task import react

    try:
        react(once)
    except SystemExit as e:
        if not results:
            print("cpvm-probe: internal error (see above)", file=sys.stderr)
            return EXIT_INTERNAL
        if e.code not in (0, None):
            return EXIT_INTERNAL
    result = results[0]
    out.write(as_json(result) if args.format == "json" else as_text(result))
    if args.textfile is not None:
        write_textfile(result, args.textfile, default_reactor.seconds())
    return result.exit_status
