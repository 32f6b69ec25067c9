"""One daemon per spool: an advisory lock on ``<spool_path>.lock``, held while the spool is open."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from control.spool_file import owner_only
from gateway.config import ConfigError


def lock_spool(path: Path) -> int:
    """Take the spool's advisory lock (``<spool_path>.lock``); the descriptor holds it.

    ConfigError when another process holds it: a second daemon on the same spool would
    overwrite the first one's journal.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Beside the file itself: two spellings of one file (a symlink) must take the same lock.
    real = path.resolve()
    lock = real.with_name(real.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"spool_path {path}: in use by another aibridged process (it holds {lock.name});"
            " give each daemon its own spool_path"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    owner_only(lock)
    return fd
