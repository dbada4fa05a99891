"""Validation of the real-shaped case (malformed ones: tests/test_bad_cases.py and its corpus)."""

from mqi_celery.case_reader import manifest, read_case
from tests.casegen import make_case


def test_real_case_is_valid(tmp_path):
    info = read_case(make_case(tmp_path))
    assert [(b.number, b.name, b.layers) for b in info.beams] == [(2, "1G180:TX", 34), (3, "2G225:TX", 32),
                                                                  (4, "3G140:TX", 42)]
    assert info.machine == "G2" and info.study_uid == "1.2.840.113854.19.1.19271.1"


def test_manifest_hashes_every_file_but_the_marker(tmp_path):
    case = make_case(tmp_path, marker=True)
    files = manifest(case, "_CASE_READY")
    assert "_CASE_READY" not in files
    assert len(files) == 1 + 3 * 2 + 2 * (34 + 32 + 42)
    assert all(len(h) == 64 for h in files.values())
