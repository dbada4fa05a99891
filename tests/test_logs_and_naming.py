import io
import json
import logging

import pytest

from mqi_celery import logs
from mqi_celery.naming import case_id_for, check_part, remote_job_dir, safe_relpath
from pathlib import PurePosixPath


def test_json_lines_carry_the_bound_correlation_id():
    stream = io.StringIO()
    logs.configure("INFO", None, stream)
    log = logging.getLogger("mqi_celery.test")
    with logs.bound("trace123"):
        log.info("uploading %s", "case-1", extra={"beam": 2})
    log.info("outside")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["correlation_id"] == "trace123" and first["message"] == "uploading case-1"
    assert first["module"] == "mqi_celery.test" and first["level"] == "INFO" and first["beam"] == 2
    assert "timestamp" in first and second["correlation_id"] is None


@pytest.mark.parametrize("name, expected", [
    ("1.2.840.113854.19.1.19271.1", "1.2.840.113854.19.1.19271.1"),
    ("../../etc", "etc"),
    ("a b", "a_b"),
])
def test_case_ids_are_safe(name, expected):
    assert case_id_for(name) == expected


def test_case_id_for_only_punctuation_is_a_hash():
    assert case_id_for("...").startswith("case-")


@pytest.mark.parametrize("bad", ["..", "a/b", "x;rm", "$(id)", "", "-rf"])
def test_unsafe_parts_and_paths_are_refused(bad):
    with pytest.raises(ValueError):
        check_part(bad)
    with pytest.raises(ValueError):
        remote_job_dir(PurePosixPath("/r"), bad, 2)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", ""])
def test_unsafe_relative_paths_are_refused(bad):
    with pytest.raises(ValueError):
        safe_relpath(bad)
