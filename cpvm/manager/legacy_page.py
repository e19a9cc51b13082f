"""The pages of the legacy console URL (``/client/console?cmd=access``): the one that sends
the browser on to its console, and the refusals.

CloudStack before 4.18 answered this URL with a frameset around the console. Here it is a
page that redirects with ``<meta http-equiv="refresh">`` and offers the same link to
click: no script and no style, so the strictest Content-Security-Policy holds
(``default-src 'none'``; meta refresh is navigation, which CSP does not govern). The page
holds a one-time token: never cached, never sent on as a Referer, never framed.
"""

from __future__ import annotations

from html import escape

#: Headers of every page this URL answers (CSP, no caching, no referrer, no framing).
PAGE_HEADERS: dict[bytes, bytes] = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Content-Security-Policy": (
        b"default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"Cache-Control": b"no-store",
    b"Referrer-Policy": b"no-referrer",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
}


def access_page(vm: str, console_url: str) -> bytes:
    """The page that opens ``console_url`` at once (and links to it, should it not)."""
    url = escape(console_url, quote=True)
    return _page(
        escape(f"Console of {vm}"),
        f'<meta http-equiv="refresh" content="0; url={url}">',
        f'<p><a href="{url}">Open the console of {escape(vm)}</a></p>',
    )


def refusal_page(text: str) -> bytes:
    """A page that says why no console was opened, in the manager's own fixed words."""
    return _page("No console", "", f"<p>{escape(text)}</p>")


def _page(title: str, head: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html>\n"
        f'<html><head><meta charset="utf-8"><title>{title}</title>{head}</head>'
        f"<body>{body}</body></html>\n"
    ).encode()
