"""Classify videos with a trained checkpoint or an export (export.py); the same code either way
(inference.VideoClassifier).

    python predict.py --checkpoint runs/synthetic/checkpoints/best clip1.mp4 clip2.webm
    python predict.py --checkpoint exports/ucf101 videos/ --top_k 3 --json       # a folder, machine-readable
    python predict.py --checkpoint exports/ucf101 data/test.jsonl --out results.jsonl --num_workers 4

Frames are sampled as in evaluation (segment centres, the model's video settings); the prompt is
the fixed training phrasing unless the input is a .jsonl of records, whose own messages are used
(a record's video may be a frame folder, with its `fps`).

A multi-label head (multi_label / label_spaces' multi_label: true) gives each class its own
probability (sigmoid): the output lists every class's ("probs" in JSON) and the chosen set, the
classes at or above `--threshold` (default 0.5); with a single-label head `--threshold T` adds the
classes whose softmax probability is at least T.

`--out FILE.jsonl` is for volume: one JSON line per video, written as it finishes (a crash or Ctrl-C
keeps what is done; the same command again skips the videos already in FILE), a progress bar, and
the throughput at the end. DataLoader workers (`--num_workers`) decode while the model runs.
"""

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import write_text
from data import USER_ERRORS
from inference import VideoClassifier, check_inputs_exist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_NNNNNNN folder or an export.py folder")
    p.add_argument("inputs", nargs="+", help="video files, folders of videos, or .jsonl/.json record files")
    p.add_argument("--label_space", default=None, help="which head to use (default: the only one / 'default')")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--threshold", type=float, default=None,
                   help="the chosen classes: probability >= this (multi-label heads: default 0.5)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding videos (0: in this process)")
    p.add_argument("--json", action="store_true", help="one JSON object per video on stdout")
    p.add_argument("--out", default=None, help="append JSON lines here as videos finish; a rerun skips those done")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        classify(args)
    except USER_ERRORS as e:
        raise SystemExit(str(e)) from None
    except OSError as e:  # --out cannot be written, or a file the checkpoint needs (its base model) is missing
        message = f"{e.filename}: {e.strerror or e}" if e.filename else str(e)
        if args.out is not None and e.filename == args.out:  # its finished lines are whole: a rerun skips them
            message += f"; the videos done are in {args.out}: the same command continues once it can be written"
        raise SystemExit(message) from None
    except KeyboardInterrupt:
        kept = f"; the videos done are in {args.out}: the same command continues" if args.out else ""
        raise SystemExit(f"interrupted{kept}") from None


def classify(args):
    check_inputs_exist(args.inputs)  # before the model loads
    clf = VideoClassifier.from_pretrained(args.checkpoint, args.device)
    space = clf.label_space(args.label_space)
    names = clf.classes[space]
    samples = clf.samples(args.inputs, space)
    args.multi_label = space in clf.multi_label
    if args.multi_label and args.threshold is None:
        args.threshold = 0.5
    if args.out is not None:
        return classify_to_file(clf, samples, names, args)
    for sample, top, error in clf.stream(samples, scored_classes(args, names), args.batch_size, args.num_workers):
        if top is None:
            print(f"unreadable video: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps(result_row(sample, top, names, error, args)))
        elif top is None:
            print(f"{sample.video}\n  unreadable video (see the warning above)")
        else:
            print(sample.video)
            for c, pr in top[:args.top_k]:
                print(f"  {pr:7.2%}  {names[c]}")
            if args.threshold is not None:
                print(f"  chosen (>= {args.threshold}): {', '.join(names[c] for c, pr in top if pr >= args.threshold)}")


def scored_classes(args, names):
    """How many classes stream returns per video: all of a multi-label head's (the output lists each
    class's probability) and all when a threshold picks the chosen set, else top_k."""
    return len(names) if args.multi_label or args.threshold is not None else args.top_k


def result_row(sample, top, names, error, args):
    row = {"video": sample.video, "label": sample.label}
    if top is None:
        return {**row, "error": error}
    row["top"] = [{"class": names[c], "index": c, "prob": round(pr, 6)} for c, pr in top[:args.top_k]]
    if args.multi_label:
        row["probs"] = {names[c]: round(pr, 6) for c, pr in sorted(top)}
    if args.threshold is not None:
        row["chosen"] = [names[c] for c, pr in top if pr >= args.threshold]
    return row


def finished_videos(path):
    """The videos already in `path`. A line cut short by a crash is dropped (the file is rewritten
    without it, then appended to), so that video runs again."""
    if not os.path.exists(path):
        return set()
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return {r["video"] for r in rows}


def classify_to_file(clf, samples, names, args):
    done = finished_videos(args.out)
    todo, queued = [], set(done)
    for s in samples:  # each video once, whatever the inputs repeat
        if s.video not in queued:
            todo.append(s)
            queued.add(s.video)
    print(f"{len(todo)} videos to classify ({len(done)} already in {args.out})", file=sys.stderr)
    bar = tqdm(total=len(todo), unit="video", desc="predict", dynamic_ncols=True)
    t0, errors = time.time(), 0
    try:
        with open(args.out, "a", encoding="utf-8") as out:
            for sample, top, error in clf.stream(todo, scored_classes(args, names), args.batch_size, args.num_workers):
                out.write(json.dumps(result_row(sample, top, names, error, args)) + "\n")
                out.flush()  # a crash keeps every finished line
                errors += top is None
                bar.update(1)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, args.out) from None  # a failed write() names no file: it was --out
    bar.close()
    elapsed = time.time() - t0
    print(f"classified {len(todo)} videos in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.2f} videos/s), "
          f"{errors} unreadable; results in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
