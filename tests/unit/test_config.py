"""Configuration: typed values, defaults, and errors naming file, key and reason."""

import pytest

from cpvm.common.inifile import ConfigError
from cpvm.proxy.config import load_config


def write(tmp_path, text):
    p = tmp_path / "cpvm.conf"
    p.write_text(text)
    return str(p)


def test_embedded_defaults():
    c = load_config(None)
    assert c.server.tls is False
    assert c.server.port == 8080
    assert c.server.allowed_origins == ("self",)
    assert str(c.server.novnc_dir) == "/usr/share/novnc"
    assert c.manager.url == "http://127.0.0.1:8250"
    assert c.manager.credential is None
    assert c.session.idle_timeout == 900
    assert c.session.max_message_size == 64 * 1024
    assert c.server.workers == 1
    assert (c.server.max_http_connections, c.server.max_http_connections_per_address) == (1000, 64)
    assert (
        c.session.max_pending,
        c.session.failed_redemption_burst,
        c.session.failed_redemption_rate,
    ) == (200, 20, 0.5)


def test_shipped_file_is_all_defaults():
    assert load_config("etc/cpvm/cpvm.conf") == load_config(None).__class__(
        **{**load_config(None).__dict__, "path": "etc/cpvm/cpvm.conf"}
    )


def test_tls_defaults_to_8443_and_needs_certificate(tmp_path):
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    c = load_config(
        write(tmp_path, f"[server]\ntls = true\ncertificate = {cert}\nprivate_key = {key}\n")
    )
    assert c.server.tls and c.server.port == 8443 and c.server.scheme == "https"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[server]\ntls = yes\ncertificate = /nonexistent.pem\n"))
    assert "[server] certificate" in str(e.value) and "does not exist" in str(e.value)


def test_credential_is_read_from_a_file(tmp_path):
    cred = tmp_path / "key"
    cred.write_text("cpvmk_abc.s3cr3t\n")
    cred.chmod(0o640)
    c = load_config(write(tmp_path, f"[manager]\ncredential_file = {cred}\n"))
    assert c.manager.credential == "cpvmk_abc.s3cr3t"


def test_credential_readable_by_others_is_refused(tmp_path):
    cred = tmp_path / "key"
    cred.write_text("cpvmk_abc.s3cr3t\n")
    cred.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"[manager]\ncredential_file = {cred}\n"))
    assert "[manager] credential_file" in str(e.value) and "chmod o-rwx" in str(e.value)
    assert "s3cr3t" not in str(e.value)


@pytest.mark.parametrize(
    "text, where, reason",
    [
        ("[server]\ntls = maybe\n", "[server] tls", "expected true or false"),
        ("[server]\nport = 70000\n", "[server] port", "at most 65535"),
        ("[server]\nbind = example.com\n", "[server] bind", "expected an IP address"),
        ("[server]\ntsl = true\n", "[server] tsl", "unknown setting"),
        ("[srever]\n", "[srever]", "unknown section"),
        (
            "[server]\nallowed_origins = dashboard.example.com\n",
            "[server] allowed_origins",
            "is not an origin",
        ),
        ("[server]\ntrusted_proxies = 10.0.0.0/33\n", "[server] trusted_proxies", "CIDR"),
        (
            "[server]\ntrusted_proxies = any\n",
            "[server] trusted_proxies",
            "'any' is not an address or CIDR network",
        ),
        ("[manager]\nurl = ftp://x\n", "[manager] url", "http:// or https://"),
        (
            "[manager]\ncredential_file = /nonexistent/key\n",
            "[manager] credential_file",
            "cannot read",
        ),
        ("[session]\nidle_timeout = soon\n", "[session] idle_timeout", "expected a number"),
        ("[log]\nformat = xml\n", "[log] format", "expected one of text, json"),
        (
            "[metrics]\nallow = prometheus.example.com\n",
            "[metrics] allow",
            "not an address, CIDR network or 'any'",
        ),
        ("not an ini file\n", "cpvm.conf", "not a valid INI file"),
        ("[server]\nmax_http_connections = -1\n", "[server] max_http_connections", "at least 0"),
        (
            "[server]\nmax_http_connections_per_address = lots\n",
            "[server] max_http_connections_per_address",
            "expected an integer",
        ),
        ("[session]\nmax_pending = 0\n", "[session] max_pending", "at least 1"),
        (
            "[session]\nfailed_redemption_burst = 0\n",
            "[session] failed_redemption_burst",
            "at least 1",
        ),
        (
            "[session]\nfailed_redemption_rate = 0\n",
            "[session] failed_redemption_rate",
            "at least 0.001",
        ),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path, text, where, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(path) or "cpvm.conf" in message
    assert where in message
    assert reason in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8250",
        "http://127.8.9.10",
        "http://[::1]:8250",
        "http://localhost:8250",
        "http://LOCALHOST./",
        "http://manager.localhost",
        "https://manager.example.com",
        "https://10.0.0.5:8250",
    ],
)
def test_manager_url_secure_or_loopback_is_accepted(tmp_path, url):
    c = load_config(write(tmp_path, f"[manager]\nurl = {url}\n"))
    assert c.manager.allow_plaintext is False
    assert c.manager.url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:8250",
        "http://manager.example.com",
        "http://[2001:db8::1]:8250",
        "http://localhost.example.com",
        "http://0.0.0.0:8250",
        "http://[::ffff:10.0.0.1]",
    ],
)
def test_plain_http_manager_off_loopback_is_refused(tmp_path, url):
    path = write(tmp_path, f"[manager]\nurl = {url}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: [manager] allow_plaintext: ")
    assert "plain HTTP" in str(e.value) and "allow_plaintext = true" in str(e.value)
    c = load_config(write(tmp_path, f"[manager]\nurl = {url}\nallow_plaintext = true\n"))
    assert c.manager.allow_plaintext is True and c.manager.url == url


def test_ipv4_mapped_loopback_counts_as_loopback():
    from cpvm.proxy.config import is_loopback_host

    assert is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("")


def test_empty_credential_file_is_refused(tmp_path):
    cred = tmp_path / "key"
    cred.write_text("\n")
    cred.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write(tmp_path, f"[manager]\ncredential_file = {cred}\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.conf"))


def test_metrics_readable_from_loopback_unless_told_otherwise(tmp_path):
    import ipaddress

    default = load_config(None).metrics
    assert default.enabled
    assert [str(n) for n in default.allow] == ["127.0.0.1/32", "::1/128"]
    c = load_config(write(tmp_path, "[metrics]\nallow = 10.1.2.0/24, 2001:db8::7\n")).metrics
    assert c.allow == (ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("2001:db8::7"))
    c = load_config(write(tmp_path, "[metrics]\nallow = any\nenabled = false\n")).metrics
    assert not c.enabled and [str(n) for n in c.allow] == ["0.0.0.0/0", "::/0"]


def test_state_directory_default_and_setting(tmp_path):
    assert str(load_config(None).server.state_directory) == "/var/lib/cpvm"
    c = load_config(write(tmp_path, f"[server]\nstate_directory = {tmp_path}/s\n"))
    assert c.server.state_directory == tmp_path / "s"


def test_recording_defaults_live_in_the_state_directory(tmp_path):
    c = load_config(None).recording
    assert str(c.directory) == "/var/lib/cpvm/recordings"
    assert (c.on_failure, c.record_input, c.retention_days, c.max_bytes) == ("end", False, 30, 0)
    c = load_config(write(tmp_path, f"[server]\nstate_directory = {tmp_path}\n")).recording
    assert c.directory == tmp_path / "recordings"
    c = load_config(
        write(tmp_path, "[recording]\non_failure = continue\nrecord_input = true\nmax_bytes = 5\n")
    ).recording
    assert (c.on_failure, c.record_input, c.max_bytes) == ("continue", True, 5)


def test_recording_on_failure_is_end_or_continue(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[recording]\non_failure = ignore\n"))
    assert "[recording] on_failure" in str(e.value) and "end, continue" in str(e.value)
