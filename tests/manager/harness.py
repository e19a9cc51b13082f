"""A real manager service inside the test reactor, and helpers to talk to it with treq."""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import reactor

from cpvm.manager import admin
from cpvm.manager.config import load_config
from cpvm.manager.tap import ManagerService, build_manager
from tests.signing import DEFAULT_TTL, signed_query


def write_config(directory: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A manager.conf in ``directory`` listening on 127.0.0.1 port 0 with a tmp data dir."""
    merged: dict[str, dict[str, Any]] = {
        "server": {"listen": "tcp:0:interface=127.0.0.1", "data_dir": str(directory / "data")},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    lines = []
    for section, values in merged.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {v}" for k, v in values.items())
        lines.append("")
    path = directory / "manager.conf"
    path.write_text("\n".join(lines))
    return path


@dataclass
class Credentials:
    account: str
    api_key: str
    secret: str


@dataclass
class Manager:
    """A running manager service and ways to reach it."""

    service: ManagerService
    config_path: Path
    port: int
    directory: Path
    clock: Any = reactor
    secrets_seen: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()

    # Admin CLI ------------------------------------------------------------------------

    def admin(self, *args: str, stdin: str | None = None) -> str:
        out = io.StringIO()
        if stdin is not None:
            import sys

            old = sys.stdin
            sys.stdin = io.StringIO(stdin)
        try:
            status = admin.main(["--config", str(self.config_path), *args], out=out)
        finally:
            if stdin is not None:
                sys.stdin = old
        assert status == 0, (args, out.getvalue())
        return out.getvalue()

    def account(self, name: str, *, is_admin: bool = False) -> Credentials:
        self.admin("account", "create", name, *(["--admin"] if is_admin else []))
        data = json.loads(self.admin("--json", "key", "create", name))
        self.secrets_seen.append(data["secretkey"])
        return Credentials(name, data["apikey"], data["secretkey"])

    def vm(
        self,
        owner: str,
        *,
        name: str = "web-01",
        state: str = "Running",
        password: str | None = "vncsecret-1",
        **options: str,
    ) -> str:
        args = [
            "vm",
            "add",
            "--name",
            name,
            "--owner",
            owner,
            "--vnc-host",
            "10.0.0.5",
            "--vnc-port",
            "5901",
            "--state",
            state,
        ]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", value]
        if password is not None:
            self.secrets_seen.append(password)
            pw = self.directory / f"pw-{uuid.uuid4().hex}"
            pw.write_text(password + "\n")
            args += ["--vnc-password-file", str(pw)]
        out = self.admin(*args)
        if password is not None:
            pw.unlink()
        return out.strip()

    def proxy_key(self, name: str) -> str:
        key = self.admin("proxy-key", "create", "--name", name).strip()
        assert key.startswith("cpvmk_")
        self.secrets_seen.append(key.split(".", 1)[1])
        return key

    # HTTP -------------------------------------------------------------------------------

    async def api(
        self,
        creds: Credentials | None,
        command: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        **params: str,
    ) -> tuple[int, Any]:
        """Call the public API, signed with ``creds`` (unless ``signature`` is given).

        Signed requests carry ``signatureVersion=3`` and an ``expires`` 5 minutes ahead on
        the manager's clock, as the default ``[security] signature_expiry = required``
        demands, unless ``signatureVersion`` or ``expires`` is given.
        """
        query = {"command": command, "response": "json", **params}
        if creds is not None:
            given = "signature" in query
            query = signed_query(
                query, creds.api_key, creds.secret, expires_at=self.clock.seconds() + DEFAULT_TTL
            )
            if not given:
                self.secrets_seen.append(query["signature"])
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        url = f"{self.base}/client/api"
        if method == "GET":
            response = await treq.get(url + "?" + urlencode(query), headers=hdrs, persistent=False)
        else:
            hdrs["Content-Type"] = ["application/x-www-form-urlencoded"]
            response = await treq.post(
                url, data=urlencode(query).encode(), headers=hdrs, persistent=False
            )
        body = await response.text()
        return response.code, json.loads(body) if body else None

    async def endpoint(self, creds: Credentials, vm_id: str, **params: str) -> dict[str, Any]:
        status, body = await self.api(
            creds, "createConsoleEndpoint", virtualmachineid=vm_id, **params
        )
        assert status == 200, body
        answer = body["createconsoleendpointresponse"]["consoleendpoint"]
        if answer["success"]:
            self.secrets_seen.append(answer["websocket"]["token"])
        return answer

    async def proxy(self, key: str | None, path: str, body: Any) -> tuple[int, Any]:
        headers = {"Content-Type": ["application/json"]}
        if key is not None:
            headers["Authorization"] = [f"Bearer {key}"]
        response = await treq.post(
            f"{self.base}/proxy/v1/{path}",
            data=json.dumps(body).encode(),
            headers=headers,
            persistent=False,
        )
        text = await response.text()
        return response.code, json.loads(text) if text else None

    async def heartbeat(
        self,
        key: str,
        *,
        host: str = "cpvm.example.com",
        port: int = 8080,
        tls: bool = False,
        capacity: int = 10,
        active: list[str] | None = None,
        address: str = "192.0.2.10",
        instance: str | None = None,
        expect: int = 200,
    ) -> dict[str, Any]:
        beat = {
            "public_host": host,
            "public_port": port,
            "tls": tls,
            "address": address,
            "capacity": capacity,
            "active_sessions": active or [],
            "version": "test",
        }
        if instance is not None:
            beat["instance"] = instance
        status, body = await self.proxy(key, "heartbeat", beat)
        assert status == expect, body
        return body

    async def redeem(
        self,
        key: str,
        token: str,
        extra: str | None = None,
        client_address: str = "127.0.0.1",
        instance: str | None = None,
    ) -> tuple[int, Any]:
        body = {"token": token, "extra": extra, "client_address": client_address}
        if instance is not None:
            body["instance"] = instance
        return await self.proxy(key, "redeem", body)


async def start_manager(
    directory: Path, sections: dict[str, dict[str, Any]] | None = None, clock: Any = None
) -> Manager:
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_config(directory, sections or {})
    service = build_manager(load_config(str(config_path)), reactor, clock=clock)
    service.startService()
    port = await service.http._waitingForPort  # type: ignore[attr-defined]
    return Manager(
        service,
        config_path,
        port.getHost().port,
        directory,
        clock if clock is not None else reactor,
    )
