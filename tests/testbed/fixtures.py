"""pytest fixture for the Slurm + sshd testbed. Use it from a test module with

    from tests.testbed.fixtures import slurm_testbed  # noqa: F401

It installs nothing: run tests/testbed/install.sh (as root) once beforehand.
Set MQI_KEEP_TESTBED=1 to keep the base dir (configs, daemon logs) after the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .cluster import Testbed, missing_binaries


@pytest.fixture(scope="session")
def slurm_testbed():
    # A missing testbed is a broken test environment, not a reason to skip silently.
    if missing := missing_binaries():
        pytest.fail(f"Slurm testbed binaries missing {missing}: "
                    "run tests/testbed/install.sh as root", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the Slurm testbed needs root (slurmd, mknod, sshd)", pytrace=False)
    # Not tmp_path_factory: /tmp/pytest-of-root is mode 700 and munged refuses a socket
    # whose directory path is not o+x. Short path also keeps the munge socket < 108 chars.
    base = Path(tempfile.mkdtemp(prefix="mqi-slurm-testbed-"))
    tb = Testbed(base)
    try:
        tb.start()
        yield tb
    finally:
        tb.stop()
        if os.environ.get("MQI_KEEP_TESTBED") == "1":
            print(f"\nslurm testbed kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
