"""The config unit's pure logic (packaging/appliance/apply-config), without a VM: what it
accepts from the drive and the kernel command line, and what it refuses, before writing."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re

import pytest

from tests.peers import REPO_ROOT

_path = REPO_ROOT / "packaging" / "appliance" / "apply-config"
_loader = importlib.machinery.SourceFileLoader("apply_config", str(_path))
_spec = importlib.util.spec_from_loader("apply_config", _loader)
apply_config = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_loader.exec_module(apply_config)
Refused = apply_config.Refused


@pytest.fixture(autouse=True)
def packaged_defaults(monkeypatch):
    monkeypatch.setattr(apply_config, "DIST_CONF", str(REPO_ROOT / "etc" / "cpvm" / "cpvm.conf"))


def drive(**files: str) -> dict[str, bytes]:
    return {
        name.replace("__", "/").replace("_", "."): text.encode() for name, text in files.items()
    }


def plan(files, cmdline=""):
    return apply_config.build_plan(files, apply_config.read_settings(files, cmdline))


GOOD = {
    "proxy.key": b"cpvmk_0123abcd.s3cret\n",
    "cpvm.conf": b"[manager]\nurl = http://10.0.2.100:8250\nallow_plaintext = true\n[server]\nport = 8081\n",
}


def test_kernel_command_line_settings():
    found = apply_config.kernel_settings(
        "root=UUID=x ro cpvm.server.public_host=c1.example.com cpvm.system.hostname=c1 quiet"
    )
    assert found == {("server", "public_host"): "c1.example.com", ("system", "hostname"): "c1"}


@pytest.mark.parametrize("word", ["cpvm.server=1", "cpvm.x", "cpvm..k=v"])
def test_kernel_command_line_malformed(word):
    with pytest.raises(Refused, match="cpvm.<section>.<key>"):
        apply_config.kernel_settings(word)


def test_secret_paths_cannot_come_from_the_command_line():
    with pytest.raises(Refused, match="set by the appliance"):
        apply_config.kernel_settings("cpvm.manager.credential_file=/tmp/k")


@pytest.mark.skipif(os.geteuid() != 0, reason="the check writes its scratch copy in /run")
def test_merged_config_sets_each_value_under_its_section_once():
    result = plan(GOOD, "cpvm.server.public_host=c1.example.com cpvm.server.port=9999")
    conf = result["conf"]
    headers = re.findall(r"^\[[^\]]+\]", conf, re.M)  # comments may name sections too
    assert headers.count("[server]") == 1 and headers.count("[manager]") == 1
    assert "port = 8081" in conf and "port = 9999" not in conf  # the drive wins
    assert "public_host = c1.example.com" in conf
    assert "credential_file = /etc/cpvm/proxy.key" in conf
    assert result["port"] == 8081 and result["key"] == "cpvmk_0123abcd.s3cret"
    assert "DHCP=yes" in result["network"] and "Name=eth0" in result["network"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the check writes its scratch copy in /run")
@pytest.mark.parametrize(
    "fragment, message",
    [
        ("[session]\nmax_sessions = lots\n", r"\[session\] max_sessions: expected an integer"),
        ("[server]\ntsl = true\n", r"\[server\] tsl"),
        ("[nonsense]\nx = 1\n", r"nonsense"),
        ("[server]\ntls = true\ncertificate = /nonexistent/cert.pem\n", r"certificate"),
    ],
)
def test_cpvm_settings_are_checked_by_cpvms_own_parser(fragment, message):
    files = {
        **GOOD,
        "cpvm.conf": b"[manager]\nurl = http://10.0.2.100:8250\nallow_plaintext = true\n"
        + fragment.encode(),
    }
    with pytest.raises(Refused, match=message):
        plan(files)


@pytest.mark.parametrize(
    "files, message",
    [
        ({"cpvm.conf": b"[manager]\nurl = http://m\n"}, "no proxy.key"),
        ({"proxy.key": b"two words"}, "single word"),
        ({**GOOD, "tls/cert.pem": b"x"}, "both tls/cert.pem and tls/key.pem"),
        ({**GOOD, "cpvm.conf": b"[manager]\ncredential_file = /k\n"}, "set by the appliance"),
        ({**GOOD, "cpvm.conf": b"[network]\nmode = dhcp\n"}, "belongs in appliance.conf"),
        ({**GOOD, "appliance.conf": b"[server]\nport = 1\n"}, "belongs in cpvm.conf"),
        ({**GOOD, "appliance.conf": b"[network]\nmode = bridge\n"}, "dhcp or static"),
        ({**GOOD, "appliance.conf": b"[network]\nmode = static\naddress = 10.0.0.5\n"}, "prefix"),
        ({**GOOD, "appliance.conf": b"[network]\naddress = 10.0.0.5/24\n"}, "need mode = static"),
        ({**GOOD, "appliance.conf": b"[system]\nhostname = bad_name!\n"}, "not a host name"),
        ({**GOOD, "appliance.conf": b"[system]\nmachine_id = 1234\n"}, "32 hexadecimal"),
        ({**GOOD, "appliance.conf": b"[system]\ncolour = red\n"}, "unknown"),
        ({**GOOD, "cpvm.conf": b"[server\n"}, "not a valid INI"),
    ],
)
def test_refused_drives_say_why(files, message):
    with pytest.raises(Refused, match=message):
        plan(files)


@pytest.mark.skipif(os.geteuid() != 0, reason="the check writes its scratch copy in /run")
def test_static_network():
    files = {
        **GOOD,
        "appliance.conf": b"[network]\nmode = static\naddress = 192.0.2.10/24\n"
        b"gateway = 192.0.2.1\ndns = 192.0.2.53, 192.0.2.54\n",
    }
    unit = plan(files)["network"]
    assert "Address=192.0.2.10/24" in unit and "Gateway=192.0.2.1" in unit
    assert "DNS=192.0.2.53" in unit and "DNS=192.0.2.54" in unit and "DHCP" not in unit
