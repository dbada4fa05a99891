"""Status messages of the original design: recorded in the events table, logged, and
published as JSON ``{command, payload, timestamp, correlation_id}`` to a topic exchange
(routing key ``<component>.<event>``) so other systems can subscribe.

Payloads carry case ids, beams, file names, hashes and reasons; never patient names.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from . import logs

log = logging.getLogger(__name__)

COMPONENT = {
    "new_case_found": "scanner",
    "inbox_entry_refused": "scanner",
    "inbox_unavailable": "scanner",
    "inbox_available": "scanner",
    "case_dropped_again": "scanner",
    "upload_success": "transfer",
    "upload_failed": "transfer",
    "download_success": "transfer",
    "download_failed": "transfer",
    "execution_started": "executor",
    "execution_success": "executor",
    "execution_failed": "executor",
    "results_verified": "conductor",
    "case_completed": "conductor",
    "case_warning": "conductor",
    "case_failed": "conductor",
    "case_retried": "conductor",
    "case_reconciled": "reconciler",
    "case_resumed": "reconciler",
    "execution_resubmitted": "executor",
    "system_status_update": "curator",
    "case_waiting": "curator",
    "execution_waiting": "curator",
    "claim_released": "curator",
    "gpu_shared": "curator",
    "qa_evaluated": "qa",
}


# Periodic pictures, not events: the latest lives in the hosts table (a row per interval
# would add a million rows a year to the events table).
SNAPSHOTS = {"system_status_update"}


def prepare(command: str, payload: dict[str, Any], *, case_id: str | None = None) -> dict[str, Any]:
    """A message not sent yet: to record with the state change it describes (see
    ``Store.update_job(event=…)``), then ``emit(…, recorded=message)``."""
    COMPONENT[command]  # a known command
    return {
        "command": command,
        "payload": {"case_id": case_id, **payload} if case_id else payload,
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "correlation_id": logs.correlation_id.get(),
    }


def emit(ctx, command: str, payload: dict[str, Any], *, case_id: str | None = None,
         recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record, log and publish one message (``recorded``: a prepared message already in
    the events table). Publishing is best effort: the events table is the record, the
    exchange is a convenience for subscribers."""
    component = COMPONENT[command]
    message = recorded or prepare(command, payload, case_id=case_id)
    if command not in SNAPSHOTS and recorded is None:
        ctx.store.add_event(command, message["payload"], case_id=case_id,
                                  correlation_id=message["correlation_id"])
    log.info("%s %s", command, case_id or "", extra={"event": command, "payload": message["payload"]})
    if _publishing(ctx):
        try:
            ctx.sender.publish(ctx.settings.broker.events_exchange, f"{component}.{command}", message)
        except Exception as exc:  # noqa: BLE001 - a subscriber outage must not fail the case
            log.warning("could not publish %s: %s", command, exc)
    return message


def emit_recorded(ctx, messages: list[dict[str, Any]]) -> None:
    """Log and publish prepared messages already recorded with their state change
    (``lifecycle``)."""
    for message in messages:
        emit(ctx, message["command"], message["payload"], case_id=message["payload"].get("case_id"), recorded=message)


def _publishing(ctx) -> bool:
    broker = ctx.settings.broker
    if broker.publish_events == "auto":
        return broker.amqp
    return broker.publish_events == "always"

