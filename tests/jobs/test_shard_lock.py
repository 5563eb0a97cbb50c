"""One run per shard of an output folder: a second run refuses (exit 2) and touches nothing; the
lock goes with its run (success, error, SIGKILL) and never blocks other shards."""

import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import llmbatch
from llmbatch import run_job
from llmbatch.jobs.errors import EXIT_INVALID, InvalidJobError, RowError
from llmbatch.jobs.shard_lock import ShardLock, lock_name


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 12)
    out = str(tmp_path / "out")

    def job(**sections):
        sections.setdefault("output", {"rows_per_part": 4})
        return jobkit.make_job(tiny_tokenizer_dir, inp, out, **sections)

    return job, out


def test_second_run_of_a_shard_refuses_and_deletes_nothing(setup):
    job, out = setup
    os.makedirs(out)
    # What a run in progress has on disk: a temporary part and a renamed, uncommitted part.
    # A second run used to delete both as leftovers of a kill.
    in_flight = [os.path.join(out, "_tmp-part-00000-00000.parquet.999"),
                 os.path.join(out, "part-00000-00000.parquet")]
    for path in in_flight:
        with open(path, "w") as f:
            f.write("in flight")
    with ShardLock(out, 0):
        with pytest.raises(InvalidJobError) as info:
            run_job(job())
    assert info.value.message == (f"output.path {out}: shard 0 is being written by another run "
                                  f"in this process (pid {os.getpid()}, another thread or "
                                  f"engine); wait for it to end or stop it")
    assert info.value.exit_code == EXIT_INVALID
    assert sorted(os.listdir(out)) == ["_lock-00000", "_tmp-part-00000-00000.parquet.999",
                                       "part-00000-00000.parquet"]


def test_other_shards_are_not_blocked(setup):
    job, out = setup
    os.makedirs(out)
    with ShardLock(out, 0):
        result = run_job(job(shard={"index": 1, "count": 2}))
    assert result.exit_code == 0
    assert ds.dataset(out).to_table().column("id").to_pylist() == list(range(6, 12))


def test_lock_is_released_after_success_and_after_an_error(setup, tmp_path):
    job, out = setup
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"prompt": ["a b", None, "c d"]}), bad)
    bad_job = job(on_row_error="fail")
    bad_job["input"]["path"] = bad
    with pytest.raises(RowError):
        run_job(bad_job, output={"path": out + "-bad"})
    assert run_job(job(), output={"path": out + "-bad"}).exit_code == 0
    assert run_job(job()).num_rows_skipped == 0
    assert run_job(job()).num_rows_skipped == 12


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path)
    code = ("import os, signal\nfrom llmbatch.jobs.shard_lock import ShardLock\n"
            f"ShardLock({out!r}, 3).acquire()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=repo)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert os.path.isfile(os.path.join(out, "_lock-00003"))
    lock = ShardLock(out, 3).acquire()
    lock.release()


def _refusal_while_another_process_holds(out: str, recorded_pid: str = "") -> tuple:
    """(the refusal's message, the holder's pid) while a child process holds shard 0's lock;
    `recorded_pid`, if given, replaces the pid the child wrote into the lock file."""
    rewrite = (f"os.ftruncate(lock._fd, 0); os.pwrite(lock._fd, b'{recorded_pid}', 0)\n"
               if recorded_pid else "")
    code = ("import os, sys\nfrom llmbatch.jobs.shard_lock import ShardLock\n"
            f"lock = ShardLock({out!r}, 0).acquire()\n{rewrite}"
            "print('held', flush=True)\nsys.stdin.read()\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=repo)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(InvalidJobError) as info:
            ShardLock(out, 0).acquire()
        return info.value.message, holder.pid
    finally:
        holder.communicate(b"", timeout=30)


def test_a_holder_in_another_process_is_named_by_its_pid(tmp_path):
    message, pid = _refusal_while_another_process_holds(str(tmp_path))
    assert message == (f"output.path {tmp_path}: shard 0 is being written by another run "
                       f"(pid {pid}); wait for it to end or stop it")


def test_another_process_under_our_pid_is_not_called_this_process(tmp_path):
    # Containers (pid namespaces) or nodes sharing a folder can hold the lock under the same
    # pid as ours: the pid alone made the message say "in this process".
    message, _ = _refusal_while_another_process_holds(str(tmp_path), str(os.getpid()))
    assert message == (f"output.path {tmp_path}: shard 0 is being written by another run "
                       f"(pid {os.getpid()}); wait for it to end or stop it")


def test_readme_output_section_documents_the_lock_file():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Output\n", 1)[1].split("\n## ", 1)[0]
    documented = [w.strip("`") for w in section.split() if w.startswith("`_lock-")]
    assert documented == ["_lock-{shard:05d}"]
    assert documented[0].format(shard=7) == lock_name(7) == "_lock-00007"
    assert "readers skip it" in section and "safe to delete when no run is active" in section


def test_lock_file_mode_follows_the_umask_and_a_read_only_one_still_locks(tmp_path,
                                                                         monkeypatch):
    """Created with 0o666 minus the umask (it was 0o644 whatever the umask, so on a
    group-shared folder a teammate's resume failed with PermissionError, exit 1). A lock file
    this user may not write is opened read-only: flock still works, only no pid is recorded.
    (The tests run as root, which ignores mode bits: the refusal is simulated.)"""
    old = os.umask(0o002)
    try:
        with ShardLock(str(tmp_path), 0):
            pass
    finally:
        os.umask(old)
    path = tmp_path / lock_name(0)
    assert path.stat().st_mode & 0o777 == 0o664
    real_open = os.open

    def no_write(p, flags, *mode):
        if p == str(path) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, flags, *mode)

    monkeypatch.setattr(os, "open", no_write)
    path.write_text("")
    with ShardLock(str(tmp_path), 0) as lock:
        assert lock._fd is not None              # held, read-only
        second = ShardLock(str(tmp_path), 0)
        with pytest.raises(InvalidJobError, match="shard 0 is being written by another run in "
                                                  "this process"):
            second.acquire()
    assert path.read_text() == ""      # no pid recorded: the holder is known by the file


def test_an_unopenable_lock_file_is_one_line(tmp_path, monkeypatch):
    def refuse(p, flags, *mode):
        raise PermissionError(13, "Permission denied", p)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(InvalidJobError) as info:
        ShardLock(str(tmp_path), 3).acquire()
    assert str(info.value) == (f"output.path {tmp_path}: cannot open the lock file "
                               f"_lock-00003: Permission denied")


def _no_model_load(loads):
    def factory(config):
        loads.append(config.model)
        raise AssertionError("the model was loaded")
    return factory


def test_a_locked_shard_refuses_before_the_model_loads(setup):
    """A duplicate run (a requeued SLURM task racing the original) used to load the whole
    model and only then find the lock taken."""
    job, out = setup
    os.makedirs(out)
    loads = []
    with ShardLock(out, 0):
        with pytest.raises(InvalidJobError) as info:
            run_job(job(), engine_factory=_no_model_load(loads))
    assert loads == []
    assert info.value.message == (f"output.path {out}: shard 0 is being written by another run "
                                  f"in this process (pid {os.getpid()}, another thread or "
                                  f"engine); wait for it to end or stop it")
    assert os.listdir(out) == ["_lock-00000"]


def test_a_model_that_fails_to_load_leaves_the_folder_as_it_found_it(setup, tmp_path):
    """The lock is taken before the model loads; a load that fails removes the lock file and
    the folders that run made, and leaves an earlier run's files (and lock file) alone."""
    job, out = setup

    def broken(config):
        raise OSError("no weights found")

    nested = str(tmp_path / "new" / "deeper" / "out")
    with pytest.raises(InvalidJobError, match="cannot load the model: no weights found"):
        run_job(job(), output={"path": nested}, engine_factory=broken)
    assert not os.path.exists(tmp_path / "new")
    assert run_job(job()).exit_code == 0
    before = sorted(os.listdir(out))
    with pytest.raises(InvalidJobError, match="cannot load the model: no weights found"):
        run_job(job(), engine_factory=broken)
    assert sorted(os.listdir(out)) == before and "_lock-00000" in before
    assert run_job(job()).num_rows_skipped == 12


def test_a_lock_file_deleted_before_the_flock_is_opened_again(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder discarded it (deleted, then
    unlocked) would hold a flock on a file no one else can see: it must lock the name anew."""
    import llmbatch.jobs.shard_lock as shard_lock

    holder = ShardLock(str(tmp_path), 0).acquire()
    real_flock = shard_lock.fcntl.flock
    calls = []

    def flock_after_discard(fd, op):
        if not calls:                 # the holder gives up between our open and our flock
            holder.discard()
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(shard_lock.fcntl, "flock", flock_after_discard)
    with ShardLock(str(tmp_path), 0) as lock:
        assert len(calls) == 2        # the deleted file, then the new one
        assert os.fstat(lock._fd).st_ino == os.stat(tmp_path / lock_name(0)).st_ino
        assert lock.created


def test_a_folder_removed_by_another_shards_failed_run_is_made_again(tmp_path, monkeypatch):
    """Run A (shard 0) made the folder; run B (shard 1) found it; A's model failed and its
    discard removed the folder between B's makedirs and B's open: B died with
    FileNotFoundError (internal error, exit 1). B makes the folder again, and being the run
    that made it now, its own discard removes it."""
    import llmbatch.jobs.shard_lock as shard_lock

    out = str(tmp_path / "new" / "out")
    a = ShardLock.claim(out, 0, "new/out")
    real_makedirs = shard_lock.os.makedirs

    def makedirs_then_a_fails(path, exist_ok=False):
        real_makedirs(path, exist_ok=exist_ok)
        monkeypatch.setattr(shard_lock.os, "makedirs", real_makedirs)     # once
        a.discard()

    monkeypatch.setattr(shard_lock.os, "makedirs", makedirs_then_a_fails)
    b_claim = ShardLock.claim(out, 1, "new/out")
    assert b_claim._fd is not None and b_claim.created
    assert os.listdir(out) == ["_lock-00001"]
    assert b_claim.made_dirs == [out, str(tmp_path / "new")]
    b_claim.discard()
    assert os.listdir(tmp_path) == []


def test_a_merge_probe_does_not_make_a_starting_run_refuse(tmp_path):
    """merge's probe (running_shards) holds a shared flock for an instant; a run starting then
    refused as a duplicate, naming the pid of a finished run. It now tries again 50 ms apart,
    and a lock a live run holds still refuses, a fraction of a second later."""
    import fcntl
    import threading
    import time

    ShardLock(str(tmp_path), 0).acquire().release()         # a finished run's file and pid
    probe = os.open(tmp_path / lock_name(0), os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.06, os.close, [probe]).start()         # the probe ends 60 ms later
    with ShardLock(str(tmp_path), 0) as lock:
        assert lock._fd is not None
        start = time.monotonic()
        with pytest.raises(InvalidJobError) as info:
            ShardLock(str(tmp_path), 0).acquire()
        waited = time.monotonic() - start
    assert info.value.message == (f"output.path {tmp_path}: shard 0 is being written by another "
                                  f"run in this process (pid {os.getpid()}, another thread or "
                                  f"engine); wait for it to end or stop it")
    assert 0.15 < waited < 1.0


def test_a_full_disk_at_the_pid_write_still_locks(tmp_path, monkeypatch):
    """ENOSPC writing the holder's pid was an internal error (exit 1) leaving the folder and
    an empty lock file behind; the pid is only for another run's message, so the lock holds."""
    from llmbatch.jobs import shard_lock

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_lock.os, "write", full)
    lock = ShardLock(str(tmp_path), 0).acquire()
    try:
        with pytest.raises(InvalidJobError, match="is being written by another run"):
            ShardLock(str(tmp_path), 0).acquire()
    finally:
        lock.release()
