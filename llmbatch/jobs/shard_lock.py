"""One writer per shard of an output folder: an advisory lock held for the whole run (no torch).

Two runs of the same shard on one output.path (a double submission, a requeued SLURM task whose
predecessor still runs) would each treat the other's in-flight temporaries and renamed-but-not-
yet-committed parts as leftovers of a kill and delete them: the other run then dies mid-commit,
or leaves a manifest entry whose part file is gone. The second run therefore refuses to start.

The lock is flock() on `_lock-SSSSS` at the top of the output folder; the kernel drops it when
the holder exits, SIGKILL included, so a killed run never leaves a stale lock. The name starts
with "_" (readers of the folder skip it) and matches none of the patterns `Manifest.clear` and
`Manifest.recover` delete. Where the file system has no flock (some Lustre mounts: ENOSYS,
EOPNOTSUPP), the run goes on without the lock, as before.

The lock is taken before the model loads (a duplicate run refuses at once, not after minutes of
loading), so a run whose model then fails to load removes the lock file it created (`discard`),
leaving the folder as it found it. Deleting a flock file is safe only because `acquire` checks,
once it holds the lock, that the name still leads to the file it locked, and starts over if not:
a run that opened the file just before it was deleted would otherwise hold a lock on a file
nobody else can see.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Optional

from llmbatch.io.layout import LOCK_RE
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.path_checks import missing_dirs

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None


_MAX_TRIES = 5
# A lock found taken is tried again this many times, this far apart, before the run refuses:
# merge's probe (running_shards) holds a shared lock for an instant, and a pipeline polling
# merge while array tasks start must not make them refuse as duplicates.
_BUSY_TRIES, _BUSY_WAIT_S = 5, 0.05
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
# (st_dev, st_ino) of the lock files this process holds: a refusal by one of them is this
# process's own (another thread or engine; flock is per open file). The pid in the file cannot
# tell: another container or node may run under the same pid.
_HELD: set[tuple[int, int]] = set()


def _file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def lock_name(shard: int) -> str:
    return f"_lock-{shard:05d}"


def running_shards(out_dir: str) -> dict[int, Optional[str]]:
    """Shards of `out_dir` whose lock a live run holds now -> the holder's pid (None when not
    recorded). Probed with a non-blocking SHARED flock, dropped at once: it conflicts with a
    run's exclusive lock (on every node, where the file system has flock) but not with another
    probe; a run starting in the instant the probe holds it tries again (_flock_exclusive). A
    lock file that cannot be opened or flocked tells nothing and counts as not running."""
    found: dict[int, Optional[str]] = {}
    if fcntl is None or not os.path.isdir(out_dir):
        return found
    for name in sorted(os.listdir(out_dir)):
        m = LOCK_RE.match(name)
        if not m:
            continue
        try:
            fd = os.open(os.path.join(out_dir, name), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                found[int(m.group(1))] = _read_pid(fd)
        finally:
            os.close(fd)               # closing drops the probe's lock
    return found


def refuse_overwrite_of_running_shards(out_dir: str, key_value: str, shard) -> None:
    """output.mode: overwrite deletes other shards' files too (all of them for a one-shard job,
    those of indices >= shard.count otherwise: Manifest.clear). If a live run holds such a
    shard's lock, refuse (InvalidJobError, exit 2): deleting its committed parts while it went
    on committing the rest left a folder that read some rows twice and lacked others.
    `key_value`: output.path as the job spells it; `shard`: an io.sharding.Shard."""
    busy = {k: pid for k, pid in running_shards(out_dir).items()
            if k != shard.index and (shard.count == 1 or k >= shard.count)}
    if busy:
        names = ", ".join(f"{k}" + (f" (pid {pid})" if pid else "") for k, pid in busy.items())
        raise InvalidJobError(f"output.path {key_value}: output.mode: overwrite would delete the "
                              f"files of shard{'s' if len(busy) > 1 else ''} {names}, which a "
                              f"running llmbatch is writing; wait for it to end or stop it")


class ShardLock:
    def __init__(self, out_dir: str, shard: int) -> None:
        self.path = os.path.join(out_dir, lock_name(shard))
        self.shard = shard
        self._fd: Optional[int] = None
        self.created = False      # this acquire created the lock file (discard removes it)
        self.made_dirs: list[str] = []     # folders this run created, deepest first

    def acquire(self) -> "ShardLock":
        """Take the lock or raise InvalidJobError (exit 2) naming the holder's pid."""
        if fcntl is None:
            return self
        # A few tries: each retry means a holder deleted the file between our open and our
        # flock (discard), which a run does once, when its model fails to load.
        for _ in range(_MAX_TRIES):
            fd, writable, created = self._open()
            try:
                _flock_exclusive(fd)
            except OSError as exc:
                holder, ours = _read_pid(fd), _file_id(fd) in _HELD
                os.close(fd)
                if exc.errno in _BUSY:
                    by = f" (pid {holder})" if holder else ""
                    if ours:
                        by = f" in this process (pid {os.getpid()}, another thread or engine)"
                    raise InvalidJobError(
                        f"output.path {os.path.dirname(self.path)}: shard {self.shard} is being "
                        f"written by another run{by}; wait for it to end or stop it") from None
                self.created = created   # (discard still removes a file it made)
                return self          # no flock on this file system: run unlocked
            if _same_file(fd, self.path):
                break
            os.close(fd)             # we locked a deleted file: open the name again
        else:
            raise InvalidJobError(f"output.path {os.path.dirname(self.path)}: the lock file "
                                  f"{os.path.basename(self.path)} keeps being replaced; is "
                                  f"another run of shard {self.shard} starting?")
        if writable:   # for the message of a run that finds the lock taken (the lock is flock)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            except OSError:
                # A full disk (or quota): the pid is only for that message. This raised an
                # internal error (exit 1) with the folders and the lock file left behind; the
                # run now goes on, and a part it cannot write is its one-line write error.
                pass
        self._fd, self.created = fd, created
        _HELD.add(_file_id(fd))
        return self

    def _open(self) -> tuple[int, bool, bool]:
        """(descriptor, writable, created). Created with mode 0o666 so the umask decides, as
        for the parts: on a group-shared folder a teammate's resume must open it too. A lock
        file this user may not write (another user's, stricter umask) is opened read-only:
        flock does not need write access; only the holder's pid is then not recorded."""
        for _ in range(_MAX_TRIES):
            try:     # O_EXCL: whether this run made the file (discard removes only its own)
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True, True
            except (FileExistsError, PermissionError):
                break    # an earlier or running run's file, or a folder we cannot add to
            except FileNotFoundError:
                # The folder is gone: the run of another shard that made it failed to load its
                # model and removed it (discard) after our claim found it. Make it again, as
                # ours now (our discard removes it); a few tries, then the one-line error below.
                made = missing_dirs(os.path.dirname(self.path))
                try:
                    os.makedirs(os.path.dirname(self.path), exist_ok=True)
                except OSError:
                    break
                self.made_dirs += [d for d in made if d not in self.made_dirs]
        try:
            return os.open(self.path, os.O_RDWR), True, False
        except (PermissionError, FileNotFoundError):
            pass     # read-only below; a file that is not there is one line from there
        try:
            return os.open(self.path, os.O_RDONLY), False, False
        except OSError as exc:
            raise InvalidJobError(f"output.path {os.path.dirname(self.path)}: cannot open the "
                                  f"lock file {os.path.basename(self.path)}: "
                                  f"{exc.strerror or exc}") from None

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(_file_id(self._fd))
            os.close(self._fd)       # closing the descriptor drops the flock
            self._fd = None

    def discard(self) -> None:
        """Release, and remove what `claim` made: the lock file if this run created it, then
        the folders it created if they are empty (a run that wrote nothing else leaves no
        trace). The file is removed while still held, so no other run can hold it then."""
        if self.created:
            self.created = False     # once: the name may be another run's file after this
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.release()
        for folder in self.made_dirs:          # deepest first
            try:
                os.rmdir(folder)
            except OSError:                    # not empty: another shard's files are there
                break

    @classmethod
    def claim(cls, out_dir: str, shard: int, key_value: str) -> "ShardLock":
        """Create the output folder (`key_value`: output.path as the job wrote it, for the
        message) and take the shard's lock; on failure leave no folder this call made."""
        made = missing_dirs(out_dir)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:   # e.g. a read-only or pseudo file system os.access cannot see
            raise InvalidJobError(f"output.path {key_value}: cannot create it: "
                                  f"{exc.strerror or exc}") from None
        lock = cls(out_dir, shard)
        lock.made_dirs = made
        try:
            return lock.acquire()
        except BaseException:
            lock.discard()
            raise

    def __enter__(self) -> "ShardLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock_exclusive(fd: int) -> None:
    """flock(LOCK_EX | LOCK_NB), tried again _BUSY_TRIES times _BUSY_WAIT_S apart while taken
    (a probe lets go within microseconds; a live run does not); raises the last OSError."""
    for _ in range(_BUSY_TRIES):
        try:
            return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _BUSY:
                raise
        time.sleep(_BUSY_WAIT_S)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd` (it was not deleted or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int) -> Optional[str]:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None
