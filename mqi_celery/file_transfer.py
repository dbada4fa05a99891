"""File Transfer (queue ``transfer``): case up, results down, both verified by SHA-256.

Uploads go to a staging folder renamed into place only once every file matches the
case manifest; a repeated upload sends only what is missing or different. Downloads are
hashed on the host, hashed again here, and renamed into place only when they agree.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from . import admission, case_reader, faults, lifecycle, messages, metrics
from .errors import Held, MQIError, NoSpace, TransferError, ValidationError
from .hosts import Host, file_sha256
from .lifecycle import CaseStep, JobStep, Stage
from .models import CaseStatus, JobStatus
from .naming import remote_input_dir, remote_output_dir

log = logging.getLogger(__name__)


def upload_verified(host: Host, local_dir: Path, remote_dir: PurePosixPath, manifest: dict[str, str]) -> dict:
    """Make ``remote_dir`` an exact copy of the manifest's files; returns what was sent."""
    files = sorted(manifest)
    staging = remote_dir.with_name(remote_dir.name + ".staging")
    for folder in (remote_dir, staging):  # files of an earlier export: the engine must never see them
        if host.exists(folder) and set(host.list_files(folder)) - set(manifest):
            host.remove_tree(folder)
    if host.exists(remote_dir) and _mismatches(host, remote_dir, manifest) == []:
        return {"files": 0, "bytes": 0}
    if host.exists(remote_dir):  # keep what already arrived: only the difference is sent
        host.remove_tree(staging)
        host.rename(remote_dir, staging)
    todo = _mismatches(host, staging, manifest) if host.exists(staging) else files
    faults.point("upload_start")  # fault tests: the disk fills before the files go up
    try:
        sent = host.put_tree(local_dir, staging, todo)
    except (ValidationError, NoSpace):
        host.remove_tree(staging)  # a file changed under us, or no room: nothing of it stays on the cluster
        raise
    faults.point("upload_sent")  # crash tests: the files are there, not yet verified
    bad = _mismatches(host, staging, manifest)
    changed = [rel for rel in bad if case_reader.sha256_or_none(local_dir, rel) != manifest[rel]]
    if changed:  # not the transfer's fault: sending it again would not help
        host.remove_tree(staging)  # nor should what was sent stay on the cluster
        raise ValidationError(f"{changed[0]} changed in the case folder after the case was validated (was it still "
                              "being copied?); retry the case to validate it again")
    if bad:
        raise TransferError(f"{len(bad)} file(s) differ from the case manifest after upload "
                            f"(first: {bad[0]}); the case will be uploaded again")
    host.rename(staging, remote_dir)
    return {"files": len(todo), "bytes": sent}


def _mismatches(host: Host, remote_dir: PurePosixPath, manifest: dict[str, str]) -> list[str]:
    remote = host.sha256(remote_dir, sorted(manifest))
    return [rel for rel in sorted(manifest) if remote.get(rel) != manifest[rel]]


def download_verified(host: Host, remote_dir: PurePosixPath, local_dir: Path) -> dict[str, str]:
    """Copy every file of ``remote_dir`` into ``local_dir``; returns name -> SHA-256."""
    names = host.list_files(remote_dir)
    remote_hashes = host.sha256(remote_dir, names)
    local_dir.mkdir(parents=True, exist_ok=True)
    got = {}
    for name in names:
        final = local_dir / Path(name).name
        expected = remote_hashes[name]
        if final.is_file() and file_sha256(final) == expected:
            got[final.name] = expected
            continue
        part = final.with_name(f".{final.name}.part")
        faults.point("download_start")  # fault tests: the results disk fills before the file comes down
        try:
            host.get(remote_dir / name, part)
            faults.point("download_part")  # crash tests: a partial download on disk
            actual = file_sha256(part)
            if actual != expected:
                raise TransferError(f"{name}: downloaded SHA-256 {actual[:12]}… differs from the host's "
                                    f"{str(expected)[:12]}…")
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)  # no half file stays, whatever stopped it
        got[final.name] = actual
    return got


def results_intact(folder: Path, results: dict[str, str]) -> bool:
    return bool(results) and all((folder / n).is_file() and file_sha256(folder / n) == h for n, h in results.items())


def upload_case(ctx, case_id: str, attempt: int = 0) -> str:
    """Send the case's files (``attempt``: how many times this upload was tried before)."""
    with in_line(ctx, case_id):
        return _upload(ctx, case_id, attempt)


@contextmanager
def in_line(ctx, case_id: str):
    """A transfer slot of the host for the block (``transport.max_transfers``); once it is
    free again, a case waiting for one is sent on. ``Held`` (no slot, or the host cannot
    take the case now) is announced here; the task parks the case (``workers.base.PipelineTask``)."""
    held = False
    try:
        with admission.transfer_slot(ctx):
            held = True
            yield
    except Held as exc:
        messages.emit(ctx, "case_waiting", {"reason": str(exc)}, case_id=case_id)
        raise
    finally:
        if held and ctx.settings.transport.max_transfers is not None and ctx.store.parked_cases():
            try:
                ctx.sender.send("mqi.resume_parked")  # the reconciler's rule for waiting cases, on its queue
            except Exception as exc:  # noqa: BLE001 - the reconciler's next run resumes them
                log.warning("could not ask for the waiting cases to resume: %s", exc)


def _upload(ctx, case_id: str, attempt: int) -> str:
    store = ctx.store
    case = store.get_case(case_id)
    if case is not None and case.stage != Stage.UPLOAD:  # redelivered after it finished: the chain goes on
        return "skipped: already uploaded"
    if case is not None and case.status is CaseStatus.QUEUED and (hold := admission.upload_hold(ctx, case)):
        raise Held(hold)  # it waits QUEUED, with the reason; resumed once the host has room
    case = lifecycle.begin(store, case_id, CaseStep.UPLOADING)
    if case is None:
        return "skipped: case no longer active"
    host, case_dir = ctx.host, Path(case.path)
    started = time.monotonic()
    try:
        case_reader.require_folder(case_dir)  # removed after it was registered: say so, send nothing
        sent = upload_verified(host, case_dir, remote_input_dir(host.root, case_id), case.manifest)
    except (FileNotFoundError, TransferError):
        case_reader.require_folder(case_dir)  # the whole case went while it was being sent
        gone = next((rel for rel in case.manifest if not (case_dir / rel).is_file()), None)
        if gone:  # not the transfer's fault: sending it again would not help
            raise ValidationError(f"{gone} disappeared from the case folder during upload (was it being removed, "
                                  "or still being copied?); put it back, then retry the case") from None
        raise
    except NoSpace as exc:  # its partial copy is gone: all of it must be sent again
        messages.emit(ctx, "upload_failed", {"reason": str(exc), "attempt": attempt}, case_id=case_id)
        raise Held(admission.after_full_disk(ctx, case, exc)) from exc  # a wait, announced by in_line
    except MQIError as exc:
        messages.emit(ctx, "upload_failed", {"reason": str(exc), "attempt": attempt}, case_id=case_id)
        raise
    metrics.TRANSFER_BYTES.labels(direction="up").inc(sent["bytes"])
    metrics.TRANSFER_SECONDS.labels(direction="up").inc(time.monotonic() - started)
    messages.emit(ctx, "upload_success", {**sent, "verified_files": len(case.manifest), "host": host.name,
                                     "seconds": round(time.monotonic() - started, 3)}, case_id=case_id)
    lifecycle.uploaded(store, case_id, ctx.settings.reconciler.lease_seconds)
    return "uploaded"


def download_results(ctx, case_id: str) -> str:
    """Fetch the results of every beam that completed (failed beams have none)."""
    with in_line(ctx, case_id):
        return _download(ctx, case_id)


def _download(ctx, case_id: str) -> str:
    store, host = ctx.store, ctx.host
    case = store.get_case(case_id)
    if case is None or case.stage != Stage.COLLECT or lifecycle.begin(store, case_id, CaseStep.DOWNLOADING) is None:
        return "skipped: case not collecting"
    local_dir = ctx.settings.paths.results / case_id
    for job in store.get_case(case_id).jobs:
        if job.status is not JobStatus.COMPLETED or results_intact(local_dir, job.results):
            continue  # failed beams have nothing; a retry keeps what is already verified here
        started = time.monotonic()
        try:
            files = download_verified(host, remote_output_dir(host.root, case_id, job.beam), local_dir)
        except NoSpace as exc:
            raise Held(admission.after_full_disk(ctx, case, exc)) from exc  # a wait, announced by in_line
        except MQIError as exc:
            messages.emit(ctx, "download_failed", {"beam": job.beam, "reason": str(exc)}, case_id=case_id)
            raise
        metrics.TRANSFER_BYTES.labels(direction="down").inc(sum((local_dir / n).stat().st_size for n in files))
        metrics.TRANSFER_SECONDS.labels(direction="down").inc(time.monotonic() - started)
        lifecycle.job_step(store, case_id, job.beam, JobStep.DOWNLOADED, results=files)
        messages.emit(ctx, "download_success", {"beam": job.beam, "files": files, "host": host.name,
                                           "seconds": round(time.monotonic() - started, 3)}, case_id=case_id)
    return "downloaded"
