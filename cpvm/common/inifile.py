"""Typed reading of INI configuration files, shared by cpvm and its manager.

Configuration is parsed once at start-up; every problem is reported as a
``ConfigError`` naming the file, the ``[section] key`` and the reason, so an
operator can fix it without reading code.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file is unreadable or holds a bad value."""

    def __init__(self, path: str, section: str | None, key: str | None, reason: str):
        self.filename = path
        self.section = section
        self.key = key
        self.reason = reason
        where = path
        if section is not None:
            where += f": [{section}]"
            if key is not None:
                where += f" {key}"
        super().__init__(f"{where}: {reason}")


class IniReader:
    """Reads typed values from one INI file and remembers which keys were used.

    ``check_unknown()`` then refuses keys nobody asked for, so a typo such as
    ``tsl = true`` fails start-up instead of being silently ignored.
    """

    def __init__(self, path: str, text: str | None = None):
        self.filename = path
        self._parser = configparser.ConfigParser(interpolation=None, strict=True)
        self._used: set[tuple[str, str]] = set()
        try:
            if text is None:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            self._parser.read_string(text, source=path)
        except OSError as e:
            raise ConfigError(path, None, None, f"cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(path, None, None, "not valid UTF-8") from None
        except configparser.Error as e:
            msg = str(e).replace("\n", " ")
            raise ConfigError(path, None, None, f"not a valid INI file: {msg}") from None

    @classmethod
    def empty(cls, path: str = "<defaults>") -> "IniReader":
        """A reader with no content: every value takes its default."""
        return cls(path, text="")

    def error(self, section: str, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.filename, section, key, reason)

    def _raw(self, section: str, key: str) -> str | None:
        self._used.add((section, key))
        if not self._parser.has_section(section):
            return None
        value = self._parser.get(section, key, fallback=None)
        if value is None:
            return None
        return value.strip()

    def get(
        self,
        section: str,
        key: str,
        default: T,
        convert: Callable[[str], T],
        expected: str,
    ) -> T:
        """Return ``convert(value)`` or ``default`` when the key is absent or empty."""
        raw = self._raw(section, key)
        if raw is None or raw == "":
            return default
        try:
            return convert(raw)
        except (ValueError, TypeError) as e:
            detail = f" ({e})" if str(e) else ""
            raise self.error(section, key, f"expected {expected}, got {raw!r}{detail}") from None

    def string(self, section: str, key: str, default: str) -> str:
        return self.get(section, key, default, str, "a string")

    def optional_string(self, section: str, key: str) -> str | None:
        return self.get(section, key, None, str, "a string")

    def boolean(self, section: str, key: str, default: bool) -> bool:
        return self.get(section, key, default, _to_bool, "true or false")

    def integer(
        self,
        section: str,
        key: str,
        default: int,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self.get(section, key, default, int, "an integer")
        self._check_range(section, key, value, minimum, maximum)
        return value

    def number(
        self,
        section: str,
        key: str,
        default: float,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self.get(section, key, default, float, "a number")
        self._check_range(section, key, value, minimum, maximum)
        return value

    def port(self, section: str, key: str, default: int) -> int:
        return self.integer(section, key, default, minimum=0, maximum=65535)

    def choice(self, section: str, key: str, default: str, choices: Iterable[str]) -> str:
        options = tuple(choices)
        value = self.string(section, key, default)
        if value not in options:
            raise self.error(section, key, f"expected one of {', '.join(options)}, got {value!r}")
        return value

    def string_list(self, section: str, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma- or whitespace-separated list."""
        return self.get(
            section,
            key,
            default,
            lambda raw: tuple(p for p in raw.replace(",", " ").split() if p),
            "a list of words",
        )

    def path(
        self,
        section: str,
        key: str,
        default: str | None,
        *,
        must_exist: bool = False,
        directory: bool = False,
    ) -> Path | None:
        value = self.get(section, key, default, str, "a path")
        if value is None:
            return None
        p = Path(value)
        if must_exist:
            if directory and not p.is_dir():
                raise self.error(section, key, f"directory {value!r} does not exist")
            if not directory and not p.is_file():
                raise self.error(section, key, f"file {value!r} does not exist")
            if not os.access(p, os.R_OK):
                raise self.error(section, key, f"{value!r} is not readable")
        return p

    def secret_file(self, section: str, key: str, default: str | None) -> str | None:
        """Read a secret from the file the key names (secrets never sit in the INI itself)."""
        p = self.path(section, key, default)
        if p is None:
            return None
        try:
            mode = p.stat().st_mode
        except OSError as e:
            raise self.error(section, key, f"cannot read {str(p)!r}: {e.strerror or e}") from None
        if mode & 0o007:
            # Like ssh with private keys: a secret anyone on the host can read is refused.
            raise self.error(
                section,
                key,
                f"{str(p)!r} is accessible by other users (mode {mode & 0o777:o}); chmod o-rwx it",
            )
        try:
            value = p.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise self.error(section, key, f"cannot read {str(p)!r}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise self.error(section, key, f"{str(p)!r} is not valid UTF-8") from None
        if not value:
            raise self.error(section, key, f"{str(p)!r} is empty")
        return value

    def _check_range(self, section, key, value, minimum, maximum) -> None:
        if minimum is not None and value < minimum:
            raise self.error(section, key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(section, key, f"must be at most {maximum}, got {value}")

    def sections_with_prefix(self, prefix: str) -> list[str]:
        """The file's sections named ``prefix`` + something, in file order: for repeated
        sections such as ``[inventory.libvirt.NAME]``. Only the keys read from them count
        as known to ``check_unknown``."""
        return [s for s in self._parser.sections() if s.startswith(prefix) and s != prefix]

    def check_unknown(self) -> None:
        """Refuse sections and keys that no setting reads (typos)."""
        known_sections = {s for s, _ in self._used}
        for section in self._parser.sections():
            if section not in known_sections:
                raise self.error(section, None, "unknown section")
            for key in self._parser.options(section):
                if (section, key) not in self._used:
                    raise self.error(section, key, "unknown setting")


def _to_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("")
