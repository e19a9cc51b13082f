"""The public API's request parameters: decoded and checked before anything else looks.

CloudStack's string to sign joins ``name=value`` pairs with ``&`` and URL-encodes only the
values, so a name holding ``=`` or ``&`` could re-group a signed request (merge
``expires=…&response=json&signatureversion`` into one name: the string to sign is the same,
while ``signatureVersion`` and ``expires`` are gone). Names are therefore restricted to
CloudStack's own alphabet, and a name may appear once, compared case-insensitively (the API
reads names case-insensitively; two spellings of one name would make the meaning depend on
which one wins). With both rules the string to sign determines the parameters.

Pure functions, no Twisted: :func:`parse_params` is what the fuzzers exercise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

# CloudStack's parameter names: letters, digits and _ . [ ] - (``tags[0].key``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\[\]-]+")
ALPHABET_TEXT = "letters, digits and _ . [ ] -"
# Longest name echoed back in an error text (names are the caller's input).
_SHOWN = 40


class ParamError(ValueError):
    """A request whose parameters are refused; ``text`` is the errortext (errorcode 431)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _shown(name: str) -> str:
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "…")


def validate_names(names: Iterable[str]) -> None:
    """Raise :class:`ParamError` for a name outside the alphabet or given twice."""
    seen: set[str] = set()
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ParamError(
                f"Invalid parameter name {_shown(name)}: only {ALPHABET_TEXT} are allowed"
            )
        folded = name.lower()
        if folded in seen:
            raise ParamError(
                f"Invalid parameter {_shown(name)}: given more than once "
                "(parameter names are compared case-insensitively)"
            )
        seen.add(folded)


def parse_params(
    args: Mapping[bytes, Sequence[bytes]],
    query_args: Mapping[bytes, Sequence[bytes]] | None = None,
) -> dict[str, str]:
    """The request's parameters (``twisted.web``'s ``request.args``) as ``{name: value}``.

    Every name must pass :func:`validate_names`; a name with several values counts as
    given more than once. ``query_args`` are the query string's own parameters: for a
    form POST ``request.args`` holds the body's value in place of a query parameter of the
    same name, and such a hidden duplicate counts too. Names and values must be UTF-8.
    """
    names: list[str] = []
    params: dict[str, str] = {}
    try:
        for raw_name, values in args.items():
            name = raw_name.decode("utf-8")
            # A name repeated with the same spelling is one key with several values.
            names.extend([name] * max(1, len(values)))
            params[name] = values[0].decode("utf-8") if values else ""
        for raw_name, values in (query_args or {}).items():
            if raw_name in args and list(args[raw_name]) != list(values):
                names.append(raw_name.decode("utf-8"))
    except UnicodeDecodeError:
        raise ParamError("parameters must be UTF-8") from None
    validate_names(names)
    return params


__all__ = ["NAME_PATTERN", "ParamError", "parse_params", "validate_names"]
