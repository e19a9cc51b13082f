"""A real ``twistd cpvm-manager`` process for attack tests, and a blocking client for it.

The manager listens on 127.0.0.1 port 0 (read from its log); accounts, VMs and proxy keys
are made with ``cpvm-manager-admin`` on the same configuration file. Requests are plain
``urllib`` calls: the tests using this are synchronous, so nothing here runs in a reactor.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cpvm.manager import admin
from tests.daemons import Daemon
from tests.manager.harness import Credentials
from tests.signing import signed_query


def _config_text(directory: Path, sections: dict[str, dict[str, Any]]) -> str:
    merged: dict[str, dict[str, Any]] = {
        "server": {"listen": "tcp:0:interface=127.0.0.1", "data_dir": str(directory / "data")},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    lines = []
    for section, values in merged.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class ManagerDaemon:
    """``twistd cpvm-manager`` started with ``sections`` on top of a test configuration."""

    def __init__(self, directory: Path, sections: dict[str, dict[str, Any]] | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.daemon = Daemon(
            "manager", "cpvm-manager", _config_text(directory, sections or {}), workdir=directory
        )
        self.base = self.daemon.url()

    def stop(self) -> None:
        self.daemon.stop()

    def log_text(self) -> str:
        return self.daemon.log_text()

    # Admin CLI ------------------------------------------------------------------------

    def admin(self, *args: str) -> str:
        out = io.StringIO()
        status = admin.main(["--config", str(self.daemon.config_path), *args], out=out)
        assert status == 0, (args, out.getvalue())
        return out.getvalue()

    def account(self, name: str) -> Credentials:
        self.admin("account", "create", name)
        data = json.loads(self.admin("--json", "key", "create", name))
        return Credentials(name, data["apikey"], data["secretkey"])

    def vm(self, owner: str) -> str:
        return self.admin(
            "vm",
            "add",
            "--name",
            "web-01",
            "--owner",
            owner,
            "--vnc-host",
            "10.0.0.5",
            "--vnc-port",
            "5901",
            "--state",
            "Running",
        ).strip()

    def proxy_key(self, name: str = "p1") -> str:
        return self.admin("proxy-key", "create", "--name", name).strip()

    # HTTP -------------------------------------------------------------------------------

    def request(
        self,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ):
        """(status, parsed JSON body or text, headers) of one request."""
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, raw, hdrs = e.code, e.read(), e.headers
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text) if text else None, hdrs
        except ValueError:
            return status, text, hdrs

    def query(self, query: dict[str, str], method: str = "GET", timeout: float = 30):
        """Send exactly these parameters (no signing)."""
        encoded = urlencode(query)
        if method == "GET":
            return self.request("/client/api?" + encoded, timeout=timeout)
        return self.request(
            "/client/api",
            encoded.encode(),
            timeout=timeout,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )

    def signed(
        self, creds: Credentials, command: str, *, ttl: float | None = 300, **params: str
    ) -> dict[str, str]:
        """Signed parameters; ``ttl=None`` signs as a v1 client (no expiry)."""
        query = {"command": command, "response": "json", **params}
        expires_at = None if ttl is None else time.time() + ttl
        return signed_query(query, creds.api_key, creds.secret, expires_at=expires_at)

    def api(self, creds: Credentials, command: str, **params: str):
        status, body, _ = self.query(self.signed(creds, command, **params))
        return status, body

    def heartbeat(self, key: str) -> None:
        body = {
            "public_host": "cpvm.example.com",
            "public_port": 8080,
            "tls": False,
            "capacity": 1000,
            "active_sessions": [],
            "version": "test",
        }
        status, answer, _ = self.request(
            "/proxy/v1/heartbeat",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        assert status == 200, answer

    def metrics(self) -> str:
        status, text, _ = self.request("/metrics")
        assert status == 200
        return text


def errortext(body: dict, command: str) -> str:
    return body[f"{command.lower()}response"]["errortext"]
