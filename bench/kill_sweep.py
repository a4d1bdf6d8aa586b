"""SIGKILL a training run at random moments of every phase, resume it with --resume auto after each
kill, and check what a kill may never do:

- leave a process of the run behind (checked by pid, 10 s after the kill: bench/proctree.py);
- leave a visible checkpoint that cannot be read (model.checkpoint_problem);
- change the training: the finished run's per-step train losses must equal an uninterrupted run's.

    python bench/kill_sweep.py                          # 24 kills of `python train.py`, 4 under torchrun
    python bench/kill_sweep.py --kills 40 --torchrun_kills 0 --seed 1

Phases, picked at random for each kill: start-up (a random time after launch, before the DataLoader
exists), loader start (just after the forkserver appears), steps (just after a train line is logged),
evaluation (once the eval workers are up), saving (while a .step_*.tmp folder is being written).
Under torchrun the kill hits rank 0; torchrun then ends the other rank. The run: the tiny model on 24
generated clips, 2 DataLoader workers, dropout on (the RNG must resume too), eval every 4 steps,
a checkpoint every 2. Linux only (reads /proc). Slow (minutes): not part of the test suite, which
keeps a representative kill-and-resume test (tests/test_resume.py) and the orphan test (tests/test_kill.py).
"""

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.proctree import ProcessTree, proc_stat  # noqa: E402
from checkpoint import checkpoint_problem  # noqa: E402
from prepare.synthetic import main as make_synthetic  # noqa: E402
from prepare.tiny_model import write_tiny_model  # noqa: E402

PHASES = ("start-up", "loader start", "steps", "evaluation", "saving")


def train_lines(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [m for m in map(json.loads, f) if m["split"] == "train"]


def saving(out):
    return bool(glob.glob(os.path.join(out, "checkpoints", ".step_*.tmp")))


def trigger(phase, tree, out, started, logged_before, delay, ranks):
    """Whether the kill for `phase` is due now."""
    if phase == "start-up":
        return time.monotonic() - started > delay
    if phase == "loader start":
        return any("multiprocessing.forkserver" in cmd for cmd in tree.alive().values())
    if phase == "steps":
        return len(train_lines(out)) > logged_before
    if phase == "evaluation":
        return len(tree.forkserver_children()) >= 4 * ranks  # 2 training + 2 evaluation workers per rank
    return saving(out)


def victim_pid(tree, launcher_pid, torchrun):
    """The trainer: the launched process itself, or torchrun's local rank 0."""
    if not torchrun:
        return launcher_pid
    for pid in tree.alive():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if proc_stat(pid)[1] == launcher_pid and b"LOCAL_RANK=0" in f.read().split(b"\0"):
                    return pid
        except (OSError, TypeError):
            continue
    return None


def launch(args, torchrun):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + args
    if torchrun:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(random.randint(20000, 40000))]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_once(args, out, phase, rng, torchrun):
    """One launch, killed in `phase`. Returns a result row, or None when the run finished first."""
    proc = launch(args, torchrun)
    tree = ProcessTree(proc.pid)
    tree.start()
    started, logged_before = time.monotonic(), len(train_lines(out))
    delay = rng.uniform(0.5, 6.0)
    try:
        while not trigger(phase, tree, out, started, logged_before, delay, 2 if torchrun else 1):
            if proc.poll() is not None:
                return None
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3) if phase in ("loader start", "steps", "evaluation") else 0)
        victim = victim_pid(tree, proc.pid, torchrun)
        if victim is None:  # torchrun has not started its ranks yet: kill the launcher itself
            victim = proc.pid
        tree.scan()
        at_step = train_lines(out)[-1]["step"] if train_lines(out) else 0
        os.kill(victim, 9)
        proc.wait(timeout=90)
        left = tree.wait_until_gone(10)
    finally:
        tree.stop()
        if proc.poll() is None:
            proc.kill()
        tree.kill_all()
    visible = sorted(glob.glob(os.path.join(out, "checkpoints", "step_*")))
    unreadable = [d for d in visible if checkpoint_problem(d) is not None]
    return {"phase": phase, "at_step": at_step, "left": len(left), "checkpoints": len(visible),
            "unreadable": len(unreadable)}


def finish(args, torchrun):
    proc = launch(args, torchrun)
    if proc.wait(timeout=1800) != 0:
        raise SystemExit(f"the run did not finish cleanly ({proc.returncode}): {args}")


def sweep(name, base, kills, torchrun, rng):
    with tempfile.TemporaryDirectory(prefix="actcls-sweep-") as tmp:
        reference, killed = os.path.join(tmp, "reference"), os.path.join(tmp, "killed")
        finish(base + ["--output_dir", reference], torchrun)
        args = base + ["--output_dir", killed, "--resume", "auto"]
        rows = []
        for k in range(kills):
            row = kill_once(args, killed, rng.choice(PHASES), rng, torchrun)
            if row is None:
                print(f"  the run finished before kill {k + 1}: raise --max_steps for more kills")
                break
            rows.append(row)
            print(f"  kill {k + 1:>2} [{row['phase']:<12}] after step {row['at_step']:>3}: {row['left']} process(es) "
                  f"left 10 s later, {row['unreadable']} of {row['checkpoints']} visible checkpoint(s) unreadable",
                  flush=True)
        finish(args, torchrun)
        ours = {m["step"]: m["loss"] for m in train_lines(killed)}
        theirs = {m["step"]: m["loss"] for m in train_lines(reference)}
    same_steps = sorted(ours) == sorted(theirs)
    worst = max(abs(ours[s] - theirs[s]) for s in theirs) if same_steps else float("nan")
    phases = {p: sum(r["phase"] == p for r in rows) for p in PHASES}
    print(f"{name}: {len(rows)} kills ({', '.join(f'{p} {n}' for p, n in phases.items())}); processes left: "
          f"{sum(r['left'] for r in rows)}; unreadable checkpoints: {sum(r['unreadable'] for r in rows)}; "
          f"steps logged {'= ' if same_steps else '!= '}the uninterrupted run's ({len(theirs)}); "
          f"max |loss difference| {worst:.3g}", flush=True)
    return sum(r["left"] + r["unreadable"] for r in rows) == 0 and same_steps and worst <= 1e-6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--torchrun_kills", type=int, default=4)
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="actcls-sweep-data-") as data:
        model = write_tiny_model(os.path.join(data, "tiny-qwen2.5-vl"), seed=0)
        make_synthetic(["--out", os.path.join(data, "clips"), "--train", "24", "--val", "8", "--size", "64",
                        "--frames", "8", "--fps", "8", "--workers", "1"])
        base = ["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", model,
                "--train_datasets", f"[{{path: {data}/clips/train.jsonl}}]",
                "--eval_datasets", f"[{{path: {data}/clips/val.jsonl}}]",
                "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--per_device_train_batch_size", "4",
                "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "2", "--lora_dropout", "0.1",
                "--max_steps", str(args.max_steps), "--logging_steps", "1", "--eval_steps", "4",
                "--save_steps", "2", "--save_total_limit", "2"]
        ok = sweep("python train.py", base, args.kills, False, rng)
        if args.torchrun_kills:  # 2 ranks x 2 clips = the same 4 clips a step
            ok &= sweep("torchrun, 2 ranks", base + ["--per_device_train_batch_size", "2"], args.torchrun_kills,
                        True, rng)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
