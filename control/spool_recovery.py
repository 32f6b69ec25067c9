"""The two ends of a spool's run: what a stop leaves behind, what the next start makes of it.

At close, ``report_unwritten`` logs what the writer could not commit: records in the journal
(replayed at the next start), and records it could not even journal (dropped, and counted).

``recover`` runs once at start, on a helper thread. The journal (``control.journal``) holds the
records the last run had copied there but SQLite had not committed when it stopped; they are
committed now, in their original sequence numbers. An interception whose ``interception_started``
is still in the spool (unacknowledged) with no ``interception_ended`` after it was cut by a crash
or kill: the spool ends it with an ``interrupted`` record, so none stays open forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import orjson

from control.journal import Journal, read_journal
from control.spool_file import Run, SpoolFile, owner_only, record_time
from control.spool_reader import SpoolReader
from control.spool_writer import BATCH_MAX
from gateway.records import InterceptionEnded

log = logging.getLogger("aibridged.spool")


@dataclass
class Recovered:
    """What ``recover`` opened and found."""

    file: SpoolFile
    reader: SpoolReader
    journal: Journal | None
    epoch: str
    high_watermark: int
    acked_through: int
    replayed: int
    unreadable: int
    left_open: list[str]


def recover(path: Path, journal_path: Path) -> Recovered:
    """Open the spool file, replay the journal, open the reader and a fresh journal."""
    file, epoch, high, acked = SpoolFile.open(path)
    try:
        replayed, unreadable, high = replay_journal(file, journal_path, epoch, high)
        left_open = file.open_interceptions()
        owner_only(journal_path)
        reader = SpoolReader(path, epoch)
    except BaseException:
        file.close()
        raise
    journal = None
    try:
        journal = Journal(journal_path, epoch)
    except OSError as exc:
        log.error(
            "usage journal unavailable: responses wait for the SQLite commit instead",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )
    return Recovered(file, reader, journal, epoch, high, acked, replayed, unreadable, left_open)


def replay_journal(
    file: SpoolFile, journal_path: Path, epoch: str, high: int
) -> tuple[int, int, int]:
    """Commit the journal's records SQLite lacks: ``(replayed, unreadable, new high watermark)``.

    A frame's checksum held, so an unreadable record is one that was written so: it is skipped,
    logged and counted as dropped.
    """
    runs: list[Run] = []
    replayed = unreadable = 0
    for seq, line in read_journal(journal_path, epoch):
        if seq <= high:
            continue
        try:
            created_at = record_time(orjson.loads(line))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            log.error("usage journal holds an unreadable record: DROPPED", extra={"seq": seq})
            unreadable += 1
            continue
        last = runs[-1] if runs else None
        if last is not None and last[0] + len(last[2]) == seq and len(last[2]) < BATCH_MAX:
            last[2].append(line)
        else:
            runs.append((seq, created_at, [line]))
        replayed += 1
    for run in runs:
        high = file.insert([run])
    return replayed, unreadable, high


def report_unwritten(committed: int, journaled: int, last: int, writer_stuck: bool) -> int:
    """Log what a closing spool could not commit (sequence numbers above ``committed`` up to
    ``last``; those up to ``journaled`` are in the journal); returns how many are dropped."""
    kept = journaled - committed
    if kept > 0:
        log.error(
            "usage spool closing with records it could not commit: kept in the journal,"
            " committed at the next start",
            extra={"records": kept},
        )
    lost = last - max(committed, journaled)
    if lost > 0:
        # A writer stuck in a write (a hung disk) may still commit some of them.
        log.error(
            "usage spool closing with records it could neither commit nor journal: DROPPED",
            extra={"dropped": lost, "writer_stuck": writer_stuck},
        )
    return max(lost, 0)


def interrupted(interception_ids: list[str]) -> list[InterceptionEnded]:
    """The end records of interceptions a killed run left open."""
    return [
        InterceptionEnded(
            interception_id,
            "interrupted",
            "gateway_stopped",
            "the gateway stopped (crash or kill) before this interception ended",
        )
        for interception_id in interception_ids
    ]
