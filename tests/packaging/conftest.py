"""Registers the ``packaging`` marker: deselect with ``-m "not packaging"`` (about a minute,
root, installs and purges the .deb)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "packaging: builds, installs (apt, as root) and purges the cpvm .deb")
