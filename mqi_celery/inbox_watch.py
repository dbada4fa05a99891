"""The Case Scanner's ears: a scan as soon as something appears where a case can show up,
instead of at the next ``scanner.interval_seconds`` (half an interval later on average: the
largest part of the pipeline's own delay per case, see docs/benchmarks.md).

It is a thread beside celery beat (one per installation) and only sends ``mqi.scan_inbox``:
what is a case, and whether it is ready, stays the scan's judgement. It watches the folders
the scan looks into for cases (the inbox and the folders between it and the cases) and the
case folders not registered yet (for their ready marker), one inotify watch each: a year
of registered cases costs no watch. Where inotify is missing (not Linux), or on a network
share (the file server's writes make no event here), the periodic scan is what there is;
it never stops.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

DEBOUNCE_MS = 50  # one copy's burst of events makes one wake-up
MIN_GAP_SECONDS = 0.1  # many cases dropped at once wake a scan every 0.1 s at most, not one each


class InboxWatch:
    """``folders()`` says what to watch: folder -> True for a case folder not registered
    yet (only its marker matters), False for a folder a new case can appear in."""

    def __init__(self, folders: Callable[[], dict[str, bool]], wake: Callable[[], None], marker: str,
                 refresh_seconds: float):
        from inotify_simple import INotify, flags

        self._inotify, self._flags = INotify(), flags
        self._mask = flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE | flags.ONLYDIR | flags.DONT_FOLLOW
        self._folders, self._wake, self._marker = folders, wake, marker
        self._refresh_seconds = refresh_seconds
        self._watches: dict[str, int] = {}  # folder -> watch descriptor
        self._case_watch: dict[int, bool] = {}  # watch descriptor -> watches a case folder
        self._full_warned = False
        self.stop = threading.Event()

    def watched(self) -> set[str]:
        return set(self._watches)

    def refresh(self) -> bool:
        """Watch exactly the folders where a case can show up now. True when a folder just
        watched may already hold news (what happened in it before its watch was missed)."""
        try:
            wanted = self._folders()
        except Exception:  # noqa: BLE001 - the database away a moment: keep the watches we have
            log.debug("the inbox watch could not list its folders", exc_info=True)
            return False
        for folder in set(self._watches) - set(wanted):
            self._case_watch.pop(self._watches[folder], None)
            try:
                self._inotify.rm_watch(self._watches.pop(folder))
            except OSError:
                pass  # the folder went away, and its watch with it
        news = False
        for folder, is_case in sorted(wanted.items()):
            if folder in self._watches:
                continue
            try:
                wd = self._watches[folder] = self._inotify.add_watch(folder, self._mask)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and not self._full_warned:
                    self._full_warned = True
                    log.warning("the inbox has more folders to watch than fs.inotify.max_user_watches allows; "
                                "those left out are found by the periodic scan (raise the limit with sysctl)")
                continue  # ENOENT: removed while we looked; ENOTDIR: a file or a link, nothing to watch
            self._case_watch[wd] = is_case
            news |= not is_case or os.path.exists(os.path.join(folder, self._marker))
        return news

    def run(self) -> None:
        news, last_wake = True, -MIN_GAP_SECONDS  # at start: what arrived while nothing watched
        self.refresh()
        while not self.stop.is_set():
            if news:
                pause = last_wake + MIN_GAP_SECONDS - time.monotonic()
                if pause > 0 and self.stop.wait(pause):
                    break
                self._wake_scanner()
                last_wake = time.monotonic()
            events = self._inotify.read(timeout=int(self._refresh_seconds * 1000), read_delay=DEBOUNCE_MS)
            # In a case folder only its marker is news (the rest is its copy going on); in the
            # folders above, anything is, and may need new watches.
            in_folders = any(not e.mask & self._flags.IGNORED and not self._case_watch.get(e.wd, False)
                             for e in events)
            news = in_folders or any(e.name == self._marker for e in events)
            if in_folders or not events:
                news |= self.refresh()

    def _wake_scanner(self) -> None:
        try:
            self._wake()
        except Exception:  # noqa: BLE001 - the broker away a moment: the periodic scan catches up
            log.debug("the inbox watch could not wake the scanner", exc_info=True)

    def close(self) -> None:
        self.stop.set()
        self._inotify.close()


def start(folders: Callable[[], dict[str, bool]], wake: Callable[[], None], marker: str,
          refresh_seconds: float) -> InboxWatch | None:
    """Start watching in a daemon thread; None (and the periodic scan alone) where inotify
    is not available."""
    try:
        watch = InboxWatch(folders, wake, marker, refresh_seconds)
    except (ImportError, OSError) as exc:
        log.info("the inbox is not watched (%s): new cases are found by the periodic scan", exc)
        return None

    def guarded():
        try:
            watch.run()
        except Exception:  # noqa: BLE001 - the periodic scan carries on without us
            if not watch.stop.is_set():
                log.warning("the inbox watch stopped; new cases are found by the periodic scan", exc_info=True)

    threading.Thread(target=guarded, name="mqi-inbox-watch", daemon=True).start()
    return watch
