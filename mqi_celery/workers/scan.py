"""Queue ``scan``: the periodic scan of the inbox, and the watch that scans at once when
something arrives (``scanner``, ``inbox_watch``)."""
from celery import signals

from .. import context, inbox_watch, scanner
from ..celery_app import app
from .base import PeriodicTask

WATCH_REFRESH_SECONDS = 2.0  # new folders are watched within this even without an event (a survey: cheap)


@app.task(name="mqi.scan_inbox", base=PeriodicTask, ignore_result=True)
def scan_inbox() -> int:
    return scanner.scan_for_admission(context.current())


@signals.beat_init.connect
def _watch_the_inbox(**_):
    """Beat runs once per installation: so does the watch."""
    ctx = context.current()
    settings = ctx.settings.scanner
    if settings.watch:
        inbox_watch.start(lambda: scanner.folders_to_watch(ctx),
                          lambda: scan_inbox.apply_async(expires=settings.interval_seconds),
                          settings.marker, refresh_seconds=min(settings.interval_seconds, WATCH_REFRESH_SECONDS))
