"""Validation of real-shaped cases: every problem named so a physicist can act on it."""
import pytest

from mqi_celery.case_reader import manifest, read_case
from mqi_celery.errors import ValidationError
from tests.casegen import BEAMS, make_case, set_beam_number


def test_real_case_is_valid(tmp_path):
    info = read_case(make_case(tmp_path))
    assert [(b.number, b.name, b.layers) for b in info.beams] == [(2, "1G180:TX", 34), (3, "2G225:TX", 32),
                                                                  (4, "3G140:TX", 42)]
    assert info.machine == "G2" and info.study_uid == "1.2.840.113854.19.1.19271.1"


@pytest.mark.parametrize("breaks, message", [
    (lambda c: [p.unlink() for p in c.glob("RP*.dcm")], "no RT plan"),
    (lambda c: (c / "RP.x.dcm").write_bytes(next(c.glob("RP*.dcm")).read_bytes()), "2 RT plans"),
    (lambda c: next(c.glob("RP*.dcm")).write_bytes(b"garbage"), "is not a readable DICOM file"),
    (lambda c: set_beam_number(c, BEAMS[2], 1), "beam 1 (SETUP), a SETUP beam, not a TREATMENT beam"),
    (lambda c: set_beam_number(c, BEAMS[2], 7), "names beam 7, which is not in the plan (plan beams: 1, 2, 3, 4)"),
    (lambda c: set_beam_number(c, BEAMS[3], 2), "beam 2 has two delivery folders"),
    (lambda c: next((c / BEAMS[4]).glob("*.ptn")).unlink(), "is missing; copy the complete delivery log"),
    (lambda c: next((c / BEAMS[4]).glob("*.mgn")).unlink(), "is missing"),
    (lambda c: (c / BEAMS[2] / "PlanRange.txt").unlink(), "has no PlanRange.txt"),
    (lambda c: sorted((c / BEAMS[2]).glob("*.ptn"))[0].write_bytes(b"x" * 17), "is truncated"),
    (lambda c: [(c / f / "PlanInfo.txt").unlink() for f in BEAMS.values()], "it has no PlanInfo.txt"),
])
def test_invalid_cases_are_named_precisely(tmp_path, breaks, message):
    case = make_case(tmp_path)
    breaks(case)
    with pytest.raises(ValidationError) as err:
        read_case(case)
    assert message in str(err.value)
    assert "ANONYMIZED" not in str(err.value)


def test_manifest_hashes_every_file_but_the_marker(tmp_path):
    case = make_case(tmp_path, marker=True)
    files = manifest(case, "_CASE_READY")
    assert "_CASE_READY" not in files
    assert len(files) == 1 + 3 * 2 + 2 * (34 + 32 + 42)
    assert all(len(h) == 64 for h in files.values())


def test_symbolic_links_are_refused(tmp_path):
    from mqi_celery.case_reader import manifest

    case = make_case(tmp_path)
    (case / BEAMS[2] / "extra.ptn").symlink_to("/etc/passwd")
    with pytest.raises(ValidationError, match="symbolic link"):
        manifest(case, "_CASE_READY")
