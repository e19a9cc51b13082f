"""cpvm-probe's parts without a network: the first-update reader, the RFB conversation
(byte vectors), the reports, the credentials, and the API leg against an in-memory
resource."""

from __future__ import annotations

import json
import struct

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web import resource

from cpvm.common.signatures import string_to_sign
from cpvm.manager.signing import verify
from cpvm.probe import cli, report
from cpvm.probe.api import ApiCredentials, console_endpoint, create_console_endpoint
from cpvm.probe.conversation import ConsoleConversation
from cpvm.probe.legs import Leg, LegFailed, ProbeResult
from cpvm.probe.screen import FirstUpdateReader, ScreenError, requests
from cpvm.rfb.events import ServerInit

PIXEL_FORMAT_32 = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
INIT = ServerInit(4, 2, PIXEL_FORMAT_32, b"desk")


def update(*rects: tuple[int, int, int]) -> bytes:
    """A FramebufferUpdate of raw rectangles (width, height, encoding)."""
    out = struct.pack("!BxH", 0, len(rects))
    for w, h, enc in rects:
        out += struct.pack("!HHHHi", 0, 0, w, h, enc) + b"\x07" * (w * h * 4 if enc == 0 else 0)
    return out


# -- the first update --------------------------------------------------------------------


def test_requests_ask_for_raw_and_the_whole_screen():
    assert requests(INIT) == struct.pack("!BxHi", 2, 1, 0) + struct.pack(
        "!BBHHHH", 3, 0, 0, 0, 4, 2
    )


def test_update_after_bell_colour_map_and_cut_text():
    stream = (
        b"\x02"
        + struct.pack("!BxHH", 1, 0, 2)
        + b"\x00" * 12
        + struct.pack("!BxxxI", 3, 5)
        + b"hello"
        + update((4, 1, 0), (4, 1, 0))
    )
    reader = FirstUpdateReader(INIT)
    got = [reader.receive(bytes([b])) for b in stream]  # one byte at a time
    assert got[:-1] == [None] * (len(stream) - 1)
    assert (got[-1].rectangles, got[-1].pixels) == (2, 8)


def test_an_update_of_no_rectangles_counts():
    assert FirstUpdateReader(INIT).receive(update()).rectangles == 0


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=4), st.data())
def test_any_split_of_an_update_reads_the_same(rects, data):
    stream = update(*[(w, h, 0) for w, h in rects])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = FirstUpdateReader(INIT)
    answers = [
        reader.receive(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)
    ]
    done = [a for a in answers if a is not None]
    assert len(done) == 1 and done[0].pixels == sum(w * h for w, h in rects)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"\x07", "message type 7"),
        (update((1, 1, 7)), "encoding 7"),
        (struct.pack("!BxxxI", 3, 2**31), "bytes of cut text"),
    ],
)
def test_what_the_probe_cannot_read_is_an_error(stream, message):
    with pytest.raises(ScreenError, match=message):
        FirstUpdateReader(INIT).receive(stream)


# -- the conversation with cpvm ----------------------------------------------------------


def test_conversation_to_the_first_update():
    c = ConsoleConversation()
    assert c.receive(b"RFB 003.008\n").send == b"RFB 003.008\n"
    assert c.receive(b"\x01\x01").send == b"\x01"  # security None, chosen
    reply = c.receive(b"\x00\x00\x00\x00")  # SecurityResult OK
    assert reply.send == b"\x01"  # ClientInit, shared
    reply = c.receive(INIT.to_bytes() + update((4, 2, 0))[:10])
    assert reply.server_init == INIT and reply.send == requests(INIT) and reply.update is None
    assert c.leg is Leg.FIRST_UPDATE
    assert c.receive(update((4, 2, 0))[10:]).update.pixels == 8


def test_cpvm_refusal_is_the_console_leg_with_its_reason():
    c = ConsoleConversation()
    c.receive(b"RFB 003.008\n")
    reason = b"token already used"
    with pytest.raises(LegFailed) as failed:
        c.receive(b"\x00" + struct.pack("!I", len(reason)) + reason)
    assert failed.value.leg is Leg.CONSOLE
    assert failed.value.reason == "cpvm refused the console: 'token already used'"


def test_a_server_asking_for_a_password_is_not_cpvm():
    c = ConsoleConversation()
    c.receive(b"RFB 003.008\n")
    with pytest.raises(LegFailed, match="needs a VNC password") as failed:
        c.receive(b"\x01\x02")
    assert failed.value.leg is Leg.CONSOLE


# -- reports -----------------------------------------------------------------------------


def failed_result() -> ProbeResult:
    r = ProbeResult(vm="vm-1", proxy="cpvm:8080")
    r.seconds = {Leg.API: 0.25, Leg.UPGRADE: 0.5}
    r.fail(LegFailed(Leg.CONSOLE, "cpvm refused the console: 'VNC server unreachable'"))
    return r


def test_text_and_json_name_the_failed_leg():
    r = failed_result()
    text = report.as_text(r)
    assert text.splitlines()[0] == (
        "cpvm-probe: FAILED at leg console (token redemption and the VNC server's handshake,"
        " to ServerInit): cpvm refused the console: 'VNC server unreachable'"
    )
    assert "  api           0.250 s" in text and "  first_update  not reached" in text
    data = json.loads(report.as_json(r))
    assert (data["exit_status"], data["failed_leg"], data["healthy"]) == (5, "console", False)
    assert data["seconds"] == {"api": 0.25, "upgrade": 0.5}


def test_textfile_is_prometheus_text_replaced_whole(tmp_path):
    path = tmp_path / "probe.prom"
    path.write_text("old\n")
    report.write_textfile(failed_result(), path, now=1000.0)
    text = path.read_text()
    assert 'cpvm_probe_success{vm="vm-1"} 0.0' in text
    assert 'cpvm_probe_exit_status{vm="vm-1"} 5.0' in text
    assert 'cpvm_probe_leg_failed{leg="console",vm="vm-1"} 1.0' in text
    assert 'cpvm_probe_leg_seconds{leg="upgrade",vm="vm-1"} 0.5' in text
    assert 'leg_seconds{leg="console"' not in text
    assert "old" not in text and [p.name for p in tmp_path.iterdir()] == ["probe.prom"]


def test_each_leg_has_its_own_exit_status():
    statuses = [leg.exit_status for leg in Leg]
    assert len(set(statuses)) == len(statuses) and not {0, 1, 2} & set(statuses)


# -- credentials -------------------------------------------------------------------------


def test_credentials_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text('{"apikey": "k", "secretkey": "s3cr3t"}')
    creds = cli.load_credentials(path, {})
    assert creds == ApiCredentials("k", "s3cr3t") and "s3cr3t" not in repr(creds)
    env = {cli.ENV_API_KEY: "k2", cli.ENV_SECRET: "s2"}
    assert cli.load_credentials(None, env) == ApiCredentials("k2", "s2")
    with pytest.raises(cli.UsageError, match="CPVM_PROBE_API_KEY"):
        cli.load_credentials(None, {cli.ENV_API_KEY: "k2"})
    path.write_text("apikey=k")
    with pytest.raises(cli.UsageError, match="expected JSON"):
        cli.load_credentials(path, {})


def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.ENV_API_KEY, raising=False)
    assert cli.main(["--manager", "http://127.0.0.1:1", "--vm", "x"]) == 2
    assert "CPVM_PROBE_API_KEY" in capsys.readouterr().err
    # There is no option that takes the secret itself.
    with pytest.raises(SystemExit):
        cli.main(["--manager", "m", "--vm", "x", "--secret", "s"])


def test_the_console_script_is_declared():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read("setup.cfg")
    assert "cpvm-probe = cpvm.probe.cli:main" in cfg["options.entry_points"]["console_scripts"]


# -- the API leg -------------------------------------------------------------------------


class FakeApi(resource.Resource):
    """Answers createConsoleEndpoint with ``answer`` after checking the signature."""

    isLeaf = True

    def __init__(self, status: int, answer: dict):
        super().__init__()
        self.status, self.answer, self.seen = status, answer, []

    def render_POST(self, request):  # noqa: N802
        params = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.seen.append(params)
        request.setResponseCode(self.status)
        return json.dumps(self.answer).encode()


ANSWER = {
    "createconsoleendpointresponse": {
        "consoleendpoint": {
            "success": True,
            "url": "https://cpvm.example:8443/resource/noVNC/vnc.html?x=1",
            "websocket": {
                "host": "cpvm.example",
                "port": "8443",
                "path": "websockify",
                "token": "T/k+n",
                "extra": "e x",
            },
        }
    }
}


@pytest_twisted.ensureDeferred
async def test_api_leg_signs_and_reads_the_endpoint():
    api = FakeApi(200, ANSWER)
    clock = Clock()
    clock.advance(1_800_000_000)
    endpoint = await create_console_endpoint(
        StubTreq(api), clock, "http://m:8250/", ApiCredentials("key", "sec"), "vm-9", timeout=5
    )
    (params,) = api.seen
    assert params["command"] == "createConsoleEndpoint" and params["virtualmachineid"] == "vm-9"
    assert params["signatureVersion"] == "3" and params["expires"] == "2027-01-15T08:05:00+0000"
    assert verify(params, "sec", params["signature"]) and string_to_sign(params)
    assert (endpoint.host, endpoint.port, endpoint.secure) == ("cpvm.example", 8443, True)
    assert endpoint.websocket_url == "wss://cpvm.example:8443/websockify?token=T%2Fk%2Bn&extra=e+x"
    assert "T/k" not in repr(endpoint)


@pytest.mark.parametrize(
    ("status", "answer", "reason"),
    [
        (
            401,
            {"createconsoleendpointresponse": {"errorcode": 401, "errortext": "bad sig"}},
            "manager answered HTTP 401: bad sig",
        ),
        (
            200,
            {
                "createconsoleendpointresponse": {
                    "consoleendpoint": {"success": False, "details": "no console proxy available"}
                }
            },
            "no console: no console proxy available",
        ),
        (200, {"other": 1}, "not a consoleendpoint"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_api_leg_failures_say_what_the_manager_said(status, answer, reason):
    with pytest.raises(LegFailed) as failed:
        await create_console_endpoint(
            StubTreq(FakeApi(status, answer)),
            Clock(),
            "http://m",
            ApiCredentials("k", "s"),
            "vm",
            timeout=5,
        )
    assert failed.value.leg is Leg.API and reason in failed.value.reason


def test_plain_console_endpoint_is_ws():
    inner = ANSWER["createconsoleendpointresponse"]["consoleendpoint"]
    plain = dict(
        inner,
        url="http://10.0.0.1:8080/resource/noVNC/vnc.html",
        websocket={"host": "10.0.0.1", "port": "8080", "token": "abc"},
    )
    assert console_endpoint(plain).websocket_url == "ws://10.0.0.1:8080/websockify?token=abc"


@pytest_twisted.ensureDeferred
async def test_a_manager_that_never_answers_fails_the_api_leg_in_time():
    import time

    import treq
    from twisted.internet import protocol, reactor

    class Silent(protocol.Protocol):
        def dataReceived(self, data):  # noqa: N802
            pass

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        started = time.monotonic()
        with pytest.raises(LegFailed) as failed:
            await create_console_endpoint(
                treq,
                reactor,
                f"http://127.0.0.1:{port.getHost().port}",
                ApiCredentials("k", "s"),
                "vm",
                timeout=0.5,
            )
        assert time.monotonic() - started < 3
        assert failed.value.leg is Leg.API
        assert "no answer from" in failed.value.reason and "within 0.5 s" in failed.value.reason
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_proxy_that_never_upgrades_fails_the_upgrade_leg_in_time():
    import time

    from twisted.internet import protocol, reactor

    from cpvm.probe.api import ConsoleEndpoint
    from cpvm.probe.websocket import probe_console

    class Silent(protocol.Protocol):
        def dataReceived(self, data):  # noqa: N802
            pass

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Silent), interface="127.0.0.1")
    n = port.getHost().port
    endpoint = ConsoleEndpoint("127.0.0.1", n, False, f"ws://127.0.0.1:{n}/websockify?token=t")
    result = ProbeResult(vm="vm")
    try:
        started = time.monotonic()
        with pytest.raises(LegFailed) as failed:
            await probe_console(reactor, endpoint, result, timeout=0.5)
        assert time.monotonic() - started < 3
        assert failed.value.leg is Leg.UPGRADE and result.seconds == {}
    finally:
        await port.stopListening()
