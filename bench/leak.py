"""Does memory grow from epoch to epoch? RSS of the trainer and of every process under it (the
DataLoader forkserver and its workers), sampled while a training run goes through several epochs.

    python bench/leak.py                                    # the demo (configs/synthetic.yaml), 6 epochs
    python bench/leak.py --epochs 10 --workers 2
    python bench/leak.py --config configs/synthetic.yaml --train_datasets '[{path: data/synthetic/train.jsonl}]'

Prints one row per epoch: the trainer's and the other processes' RSS at the end of the epoch, and each
as a ratio to the end of epoch 1 (the baseline, measured in the same run: the first epoch includes
start-up, imports and allocator warm-up). A leak shows as a ratio that keeps climbing; flat ratios
after epoch 1 mean no growth. Linux only (reads /proc).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.proctree import ProcessTree, rss_mb  # noqa: E402


def current_epoch(metrics):
    """The epoch of the last train line of metrics.jsonl (0 before the first one)."""
    try:
        with open(metrics) as f:
            lines = [json.loads(line) for line in f if '"train"' in line]
    except (OSError, json.JSONDecodeError):
        return 0
    return lines[-1]["epoch"] if lines else 0


def sample(proc, metrics, samples, interval):
    tree = ProcessTree(proc.pid)
    while proc.poll() is None:
        tree.scan()
        others = tree.alive()
        samples.append((current_epoch(metrics), rss_mb(proc.pid), sum(rss_mb(p) for p in others), len(others)))
        time.sleep(interval)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=1, help="dataloader_num_workers")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    args, overrides = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="actcls-leak-") as out:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", args.config, "--output_dir", out,
               "--num_train_epochs", str(args.epochs), "--max_steps", "-1", "--eval_steps", "0", "--save_steps", "0",
               "--eval_datasets", "[]", "--logging_steps", "1", "--dataloader_num_workers", str(args.workers),
               *overrides]
        print("+ " + " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples = []
        sampler = threading.Thread(target=sample, args=(proc, os.path.join(out, "metrics.jsonl"), samples,
                                                        args.interval))
        sampler.start()
        _, err = proc.communicate()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    ends = {}
    for epoch, trainer, others, count in samples:  # the last sample taken in each epoch
        if epoch < args.epochs:
            ends[epoch] = (trainer, others, count)
    base_trainer, base_others, _ = ends[min(ends)]
    print(f"{'epoch':>5} | {'trainer MB':>10} {'ratio':>6} | {'workers MB':>10} {'ratio':>6} | processes")
    for epoch, (trainer, others, count) in sorted(ends.items()):
        print(f"{epoch + 1:>5} | {trainer:>10.0f} {trainer / base_trainer:>5.3f}x | {others:>10.0f} "
              f"{(others / base_others if base_others else 0):>5.3f}x | {count:>9}")


if __name__ == "__main__":
    main()
