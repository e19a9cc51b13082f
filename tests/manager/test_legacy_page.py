"""The legacy console URL's pages (cpvm/manager/legacy_page.py): a redirect without
script, escaped, under a CSP that allows nothing else."""

from __future__ import annotations

from html.parser import HTMLParser

from cpvm.manager.legacy_page import PAGE_HEADERS, access_page, refusal_page

URL = (
    "https://cpvm.example:8443/resource/noVNC/vnc.html?autoconnect=true&path=websockify%3Ftoken%3DT"
)


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parsed(page: bytes) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(page.decode())
    return p.tags


def test_the_page_redirects_to_the_console_and_links_to_it():
    tags = parsed(access_page("web-01", URL))
    (refresh,) = [a for t, a in tags if t == "meta" and a.get("http-equiv") == "refresh"]
    assert refresh["content"] == f"0; url={URL}"  # the parser undoes &amp;
    assert [a["href"] for t, a in tags if t == "a"] == [URL]
    assert not [t for t, _ in tags if t in ("script", "style", "iframe", "frame")]


def test_names_are_escaped():
    page = access_page('<script>alert(1)</script>"', URL).decode()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>" not in refusal_page("<b>x</b>").decode()


def test_the_policy_allows_nothing_the_page_does_not_need():
    csp = PAGE_HEADERS[b"Content-Security-Policy"].decode()
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert PAGE_HEADERS[b"Cache-Control"] == b"no-store"
    assert PAGE_HEADERS[b"Referrer-Policy"] == b"no-referrer"
