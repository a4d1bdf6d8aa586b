"""Convert a folder tree of labelled clips (<root>/<class>/<clip>) into actcls records.

usage: python prepare/folders.py --root DIR --out DIR [--val_fraction 0.1 --seed 0 | --val_root DIR]
                                 [--frame_fps F] [--template varied|fixed]

Reads <root>/<class>/<clip>: each folder in --root is a class (classes.json: the folder names, sorted;
label = index), and each clip in it is a video file (.mp4 .avi .webm .mkv .mov, any case) or a frame
folder (a folder of images .jpg .jpeg .png .bmp, one frame each, numbered: img_00001.jpg, 00001.jpg,
frame_000001.png). Anything else in a class folder (not a video, an empty file, an empty frame folder,
a folder that mixes images with other files, a frame folder with a gap in its numbers or several
series of images, hidden files such as .DS_Store) is skipped and listed with the reason; a class
folder without a single clip is an error. A frame folder has no frame rate of its own: --frame_fps F
writes "fps": F into the frame folders' records, or the config gives it (the dataset entry's
`frame_fps`); training stops and asks when neither does.

The val split: --val_root DIR, a second tree with the same class folders, or else --val_fraction F
(default 0.1) of each class's clips, drawn per class with --seed (stratified: each class gives
round(F x its clips), at least 1 and never all, so every class with 2 or more clips is in both
splits; a class's draw depends only on --seed and its own clips, so it is the same every run).
Writes into --out: train.jsonl, val.jsonl, classes.json and skipped.txt (one line per skipped entry:
path<TAB>reason). Video paths are "<class>/<clip>", relative to --root (and val.jsonl's to
--val_root when given), so a config sets video_root to the absolute folder printed at the end.
"""

import argparse
import os
import random
import sys

# make `prepare.records` importable both as `python prepare/folders.py` and as `import prepare.folders`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import (MAX_MISSING_SHOWN, add_record_options, print_video_root, report_problems,  # noqa: E402
                             write_atomic, write_splits)
from video import IMAGE_EXTENSIONS, DataError, frame_files  # noqa: E402

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
DEFAULT_VAL_FRACTION = 0.1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding <class>/<clip> (the train clips)")
    p.add_argument("--out", required=True, help="output folder")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val_fraction", type=float,
                     help=f"share of each class's clips drawn into val.jsonl (default {DEFAULT_VAL_FRACTION})")
    val.add_argument("--val_root", help="folder holding the val clips, with the same class folders as --root")
    p.add_argument("--frame_fps", type=float, help="the frame rate of the frame folders, written as their records' fps")
    add_record_options(p, allow_missing=False, seed_help="seed of the --val_fraction draw and of the phrasing draw")
    return p.parse_args(argv)


def not_a_clip(entry):
    """Why a class folder's entry is not a clip, or None when it is one."""
    if entry.name.startswith("."):
        return "hidden file"
    if entry.is_dir():
        with os.scandir(entry.path) as inside:
            files = [e for e in inside if not e.name.startswith(".")]
        if not files:
            return "empty frame folder"
        others = [e.name for e in files if not (e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))]
        if len(others) == len(files) and any(name.lower().endswith(VIDEO_EXTENSIONS) for name in others):
            return "folder of videos: clips must sit directly in the class folder"
        if others:
            return f"folder with files other than {'/'.join(IMAGE_EXTENSIONS)} images (e.g. {sorted(others)[0]!r})"
        try:  # the training-time reading of a frame folder: numbered frames, one series, no gap
            frame_files(entry.path)
        except DataError as e:
            return f"frame folder that cannot be read as a clip ({str(e).removeprefix(entry.path + ': ')})"
        return None
    if not entry.is_file():
        return "neither a file nor a folder"
    if not entry.name.lower().endswith(VIDEO_EXTENSIONS):
        return f"not a video (extension not one of {' '.join(VIDEO_EXTENSIONS)})"
    if entry.stat().st_size == 0:
        return "empty file"
    return None


def scan_tree(root, skipped, problems):
    """<root>/<class>/<clip> -> {class: sorted clip paths relative to root}; what is not a clip goes
    to `skipped` as (path, reason), a class folder without clips to `problems`."""
    if not os.path.isdir(root):
        raise SystemExit(f"{root}: not a folder; it must hold one folder of clips per class")
    tree = {}
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                skipped.append((entry.path, "hidden" if entry.name.startswith(".") else "not in a class folder"))
                continue
            clips = []
            with os.scandir(entry.path) as inside:
                for clip in sorted(inside, key=lambda e: e.name):
                    reason = not_a_clip(clip)
                    if reason is None:
                        clips.append(f"{entry.name}/{clip.name}")
                    else:
                        skipped.append((clip.path, reason))
            if not clips:
                problems.append(f"{entry.path}: class folder with no clips (a video file or a folder of images); "
                                f"add clips or remove the folder")
            tree[entry.name] = clips
    if not tree:
        problems.append(f"{root}: no class folders; it must hold one folder of clips per class")
    return tree


def draw_val(clips, fraction, rng):
    """One class's clips -> (train, val): round(fraction x n) val clips, at least 1 and never all."""
    n_val = 0 if len(clips) < 2 else min(len(clips) - 1, max(1, round(fraction * len(clips))))
    chosen = set(rng.sample(range(len(clips)), n_val))
    return [c for i, c in enumerate(clips) if i not in chosen], [c for i, c in enumerate(clips) if i in chosen]


def report_skipped(skipped):
    if not skipped:
        return
    print(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not clips:", file=sys.stderr)
    for path, reason in skipped[:MAX_MISSING_SHOWN]:
        print(f"  {path}: {reason}", file=sys.stderr)
    if len(skipped) > MAX_MISSING_SHOWN:
        print(f"  ... and {len(skipped) - MAX_MISSING_SHOWN} more", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    if args.val_root is None and not 0 < fraction < 1:
        raise SystemExit(f"--val_fraction {fraction}: must be between 0 and 1 (e.g. 0.1)")
    if args.frame_fps is not None and not args.frame_fps > 0:
        raise SystemExit(f"--frame_fps {args.frame_fps}: must be a positive frame rate")

    skipped, problems = [], []
    tree = scan_tree(args.root, skipped, problems)
    names = sorted(tree)
    if args.val_root is not None:
        val_tree = scan_tree(args.val_root, skipped, problems)
        problems += [f"{os.path.join(args.val_root, c)}: class folder not in --root {args.root}; the two trees "
                     f"need the same class folders" for c in sorted(set(val_tree) - set(tree))]
        problems += [f"{args.val_root}: no folder for class {c!r} of --root; the two trees need the same class "
                     f"folders" for c in names if c not in val_tree]
    report_skipped(skipped)
    report_problems(problems)

    splits = {"train": [], "val": []}
    for label, cls in enumerate(names):
        if args.val_root is None:
            # a generator per class, seeded by the class's name: its draw does not shift when
            # another class gains or loses clips (a str seed is hashed the same in every process)
            train, val = draw_val(tree[cls], fraction, random.Random(f"{args.seed}/{cls}"))
        else:
            train, val = tree[cls], val_tree[cls]
        splits["train"] += [(clip, label) for clip in train]
        splits["val"] += [(clip, label) for clip in val]

    skipped_file = os.path.join(args.out, "skipped.txt")
    write_atomic(skipped_file, "".join(f"{path}\t{reason}\n" for path, reason in skipped))
    print(f"wrote {skipped_file}: {len(skipped)} skipped")
    roots = {"train": args.root, "val": args.val_root if args.val_root is not None else args.root}
    folders = {clip for split, entries in splits.items() for clip, _ in entries
               if os.path.isdir(os.path.join(roots[split], clip))}
    fps = (lambda clip: {"fps": args.frame_fps} if clip in folders else {}) if args.frame_fps is not None else None
    write_splits(args.out, splits, names, args.template, args.seed, fps)
    if folders and args.frame_fps is None:
        print(f"{len(folders)} clip(s) are frame folders, whose records have no fps: give the frame rate as "
              f"frame_fps in the dataset entry, or run again with --frame_fps F")
    if args.val_root is None:
        print_video_root(args.root)
    else:
        print_video_root(args.root, "the train dataset's video_root")
        print_video_root(args.val_root, "the eval dataset's video_root")


if __name__ == "__main__":
    main()
