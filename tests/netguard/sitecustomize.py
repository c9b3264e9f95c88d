"""Loaded by the Python processes the tests start (tests/conftest.py puts this folder on PYTHONPATH):
any connection to a non-loopback address, or a DNS lookup of a remote name, fails in them too."""

from netguard_rules import install

install()
