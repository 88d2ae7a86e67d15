"""Fixtures of the shipped configuration's fleet (tests/security/deploy_harness.py)."""

from tests.security.deploy_harness import connect, deploy, fleet, witness

__all__ = ["connect", "deploy", "fleet", "witness"]
