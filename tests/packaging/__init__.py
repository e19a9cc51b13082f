"""Tests of the Debian package: build, install, run the installed daemons, purge."""
