"""A trainer killed with SIGKILL (the OOM killer, a scheduler's hard kill) must not leave processes
behind: its DataLoaders' forkserver, their workers (~0.7 GB each) and the resource tracker go within
seconds (loaders.exit_with_trainer). Each case here failed before that fix. bench/kill_sweep.py kills at
random moments of every phase, with --resume auto after each. Linux: the tree is read from /proc."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from bench.proctree import ProcessTree, proc_stat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from /proc")


def logged_steps(out):
    path = os.path.join(out, "metrics.jsonl")
    return open(path).read().count('"split": "train"') if os.path.exists(path) else 0


# When to kill: a condition on the run, checked every 0.05 s.
MOMENTS = {
    "training": lambda tree, out: logged_steps(out) >= 2,  # the training workers are busy
    "evaluation": lambda tree, out: len(tree.forkserver_children()) >= 4,  # the eval workers are up too
}


def rank_pid(tree, launcher, rank):
    """The pid of torchrun's local rank `rank`, or None."""
    for pid in tree.alive():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if proc_stat(pid)[1] == launcher and f"LOCAL_RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.parametrize("launcher,moment", [("python", "training"), ("python", "evaluation"), ("torchrun", "training")])
def test_sigkilled_trainer_leaves_no_process(launcher, moment, base_args, tmp_path):
    """SIGKILL the trainer (under torchrun: rank 0) at `moment`; every process of the run must be gone
    10 s later (under torchrun: the killed rank's within 10 s, the other rank's once torchrun has ended
    it, which it does at once on a rank's failure)."""
    out = str(tmp_path / "run")
    args = base_args + ["--output_dir", out, "--dataloader_num_workers", "2", "--max_steps", "1000",
                        "--eval_steps", "2", "--save_steps", "0"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + args
    if launcher == "torchrun":
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(random.randint(20000, 40000))]
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    tree = ProcessTree(proc.pid)
    tree.start()
    try:
        deadline = time.monotonic() + 150
        while not MOMENTS[moment](tree, out):
            assert proc.poll() is None, f"the run ended before {moment}"
            assert time.monotonic() < deadline, f"no {moment} within 150 s"
            time.sleep(0.05)
        tree.scan()
        before = tree.alive()
        assert any("multiprocessing.forkserver" in cmd for cmd in before.values())
        if launcher == "python":
            proc.kill()
            proc.wait()
            left = tree.wait_until_gone(10)
        else:
            victim = ProcessTree(rank_pid(tree, proc.pid, 0))
            victim.scan()
            victim.seen[victim.root] = tree.seen[victim.root]
            os.kill(victim.root, signal.SIGKILL)
            left = victim.wait_until_gone(10)
            proc.wait(timeout=60)  # torchrun ends the other rank (SIGTERM, SIGKILL 30 s later) and exits
            assert proc.returncode != 0
            left = {**left, **tree.wait_until_gone(10)}
        log.seek(0)
        assert not left, (f"alive 10 s after the SIGKILL: {left}\n(alive at the kill: {list(before.values())})\n"
                          + log.read()[-2000:])
    finally:
        tree.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tree.kill_all()
