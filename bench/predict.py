"""Batch prediction speed: predict.py's batch path against one video at a time, in the same run.

    python bench/predict.py                           # tiny model, generated clips, CPU
    python bench/predict.py --export DIR --videos clips/ --device cuda

one_by_one   VideoClassifier.predict([video]) per video: decode, then forward, nothing overlaps (the
             old predict.py's way, batch 1).
batch_wN     VideoClassifier.stream over all videos, --batch videos a batch, N DataLoader workers
             decoding while the model runs (what `predict.py --out` runs).
Prints videos/s and the ratio to one_by_one. Without --export it trains the tiny model for one step
and exports it first (the numbers then say how decode and batching overlap, not how a 3B model runs).
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import export  # noqa: E402
import train  # noqa: E402
from inference import VideoClassifier  # noqa: E402
from prepare.synthetic import main as make_synthetic  # noqa: E402
from prepare.tiny_model import write_tiny_model  # noqa: E402


def tiny_export(work, clips):
    """A tiny model trained one step, exported; generated clips. Returns (export dir, clips folder)."""
    base = write_tiny_model(os.path.join(work, "tiny"), seed=0)
    make_synthetic(["--out", os.path.join(work, "syn"), "--train", "8", "--val", str(clips), "--size", "112",
                    "--frames", "32", "--fps", "8", "--workers", "1"])
    train.main(["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", base,
                "--train_datasets", f"[{{path: {work}/syn/train.jsonl}}]", "--eval_datasets", "[]",
                "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0", "--max_steps", "1",
                "--output_dir", os.path.join(work, "run")])
    export.main(["--checkpoint", os.path.join(work, "run", "checkpoints", "step_0000001"),
                 "--out", os.path.join(work, "export"), "--dtype", "fp32"])
    return os.path.join(work, "export"), os.path.join(work, "syn", "videos")


def timed(fn):
    t0 = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default=None, help="an export.py folder (default: a tiny one made here)")
    p.add_argument("--videos", default=None, help="a folder of videos (default: generated clips)")
    p.add_argument("--clips", type=int, default=48, help="generated clips (without --videos)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        target, videos = (args.export, args.videos) if args.export else tiny_export(work, args.clips)
        clf = VideoClassifier.from_pretrained(target, args.device)
        samples = clf.samples([videos])
        clf.predict([samples[0].video])  # warm-up: first-call costs are not the steady state
        rates = {"one_by_one": timed(lambda: sum(len(clf.predict([s.video])) for s in samples))}
        for workers in [int(w) for w in args.workers.split(",")]:
            rates[f"batch{args.batch}_w{workers}"] = timed(
                lambda: sum(1 for _ in clf.stream(samples, 5, args.batch, workers)))
    print(f"\n{len(samples)} videos, {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'path':<16}{'videos/s':>10}{'vs one_by_one':>15}")
    for name, rate in rates.items():
        print(f"{name:<16}{rate:>10.2f}{rate / rates['one_by_one']:>14.2f}x")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
