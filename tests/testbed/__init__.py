"""Integration testbed: a real single-node Slurm behind a private sshd (see cluster.py)."""

from .cluster import Testbed, TestbedError

__all__ = ["Testbed", "TestbedError"]
