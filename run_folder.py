"""A run's folder (output_dir) belongs to that run. Two guards, both taken before anything is written:

    owner = claim(cfg, rank)    # every rank; a live run's folder, or a finished one's without
    ...                         # --resume / overwrite_output_dir, stops the launch with one line
    owner.close()               # (the kernel releases it too when the process dies, even on kill -9)

- The lock: rank 0 holds an exclusive flock on output_dir/.actcls.lock for its lifetime, with its
  host, pid and start time written inside. A second train.py or --eval_only on the folder finds it
  taken and names that run. A killed run holds nothing: the kernel drops the lock with the process,
  so the --resume auto that follows is never blocked. Under torchrun, and across nodes on a shared
  filesystem, only global rank 0 locks: one run, one owner. (Linux NFS clients since 2.6.12 emulate
  flock with the server's byte-range locks, unless mounted with local_lock, so nodes see each
  other's: flock(2). Not tried across machines here.)
- What a run left: a fresh training run (no --resume) in a folder holding another run's
  checkpoints, metrics.jsonl or TensorBoard events stops, and says the three ways on: continue it
  (--resume auto), pick another output_dir, or overwrite_output_dir: true, which deletes those
  files first (only those: nothing else in the folder is touched).
"""

import datetime
import errno
import fcntl
import glob
import json
import os
import socket

from checkpoint import remove
from distributed import broadcast_from_rank0, print0

LOCK_FILE = ".actcls.lock"
# What a training run writes into output_dir (train.py, metrics.py, checkpoint.py, wandb offline).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "events.out.tfevents.*", "config.yaml", "wandb")
# What shows that a run trained there: config.yaml alone is written before any step.
TRAINED_OUTPUTS = ("checkpoints/step_*", "checkpoints/best", "metrics.jsonl", "events.out.tfevents.*")


class FolderTaken(Exception):
    """output_dir belongs to another run, live or finished; the message says which and what to do."""


def claim(cfg, rank):
    """Every rank calls it (a collective). Rank 0 creates output_dir, takes its lock and checks what
    an earlier run left there; all ranks then stop with rank 0's message, or go on. Returns the
    open lock file on rank 0 (keep it open for the run's lifetime), None elsewhere."""
    lock, problem = None, None
    os.makedirs(cfg.output_dir, exist_ok=True)  # every rank (distributed.check_shared_output_dir looks in it)
    if rank == 0:
        try:
            lock = take_lock(cfg.output_dir)
            if not cfg.eval_only:
                clear_or_refuse(cfg)
        except (FolderTaken, OSError) as e:
            problem = str(e)
    problem = broadcast_from_rank0(problem)
    if problem is not None:
        if lock is not None:
            lock.close()
        raise FolderTaken(problem)
    return lock


def take_lock(output_dir):
    """The open lock file, locked; FolderTaken naming the holder when a live process has it."""
    path = os.path.join(output_dir, LOCK_FILE)
    lock = open(path, "a+")  # not "w": that would wipe the holder's details before we know it is live
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # a filesystem without locks: say so, go on
            print0(f"warning: {path}: this filesystem does not support file locks ({e.strerror}); a second run "
                   f"started on {output_dir} would not be stopped")
            return lock
        lock.seek(0)
        holder = lock.read()
        lock.close()
        raise FolderTaken(f"output_dir {output_dir} belongs to a live run: {describe(holder)}. Wait for it to end or "
                          f"stop it, or pick another output_dir.") from None
    lock.seek(0)
    lock.truncate()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}))
    lock.flush()
    return lock


def describe(holder):
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):  # it is writing its details this very moment
        return "a process that has just started"


def previous_outputs(output_dir):
    """The files and folders in output_dir that show a run trained there, sorted."""
    return sorted({p for pattern in TRAINED_OUTPUTS for p in glob.glob(os.path.join(output_dir, pattern))
                   if not (p.endswith("metrics.jsonl") and os.path.getsize(p) == 0)})


def clear_or_refuse(cfg):
    """A fresh run (no --resume) in a folder another run trained in: refused, or with
    overwrite_output_dir that run's outputs are deleted first."""
    if cfg.resume is not None:
        return
    found = previous_outputs(cfg.output_dir)
    if not found:
        return
    shown = ", ".join(os.path.relpath(p, cfg.output_dir) for p in found[:4]) + (" ..." if len(found) > 4 else "")
    if not cfg.overwrite_output_dir:
        raise FolderTaken(f"output_dir {cfg.output_dir} holds an earlier run ({shown}). Continue it with --resume "
                          f"auto, pick another output_dir, or pass --overwrite_output_dir true to delete that run "
                          f"first.")
    for pattern in RUN_OUTPUTS:
        for path in glob.glob(os.path.join(cfg.output_dir, pattern)):
            remove(path)
    print0(f"overwrite_output_dir: deleted the earlier run in {cfg.output_dir} ({shown})")
