"""Convert mmaction2 annotation lists (videos or rawframes) into actcls records.

usage: python prepare/mmaction.py --train_list ucf101_train_split_1_videos.txt
                                  --val_list ucf101_val_split_1_videos.txt --root data/ucf101/videos --out DIR
                                  [--val_root DIR] [--classes label_map.txt] [--format auto|videos|rawframes]
                                  [--frame_fps F] [--template varied|fixed] [--allow-missing] [--seed 0]

Reads the two mmaction2 lists, one clip per line, fields separated by whitespace as mmaction2 does:
  videos:    "<path> <label>"                      (VideoDataset, ann_file of *_videos.txt)
  rawframes: "<frame_dir> <total_frames> <label>"  (RawframeDataset, ann_file of *_rawframes.txt)
labels are 0-based class ids. --format auto (the default) tells them apart by the first line's column
count; multi-label lines and rawframes lists with a start offset are not supported. Paths are relative
to --root (mmaction2's data_prefix) for the train list and to --val_root (default: --root) for the val
list. --classes: one class name per line, the first naming label 0 (mmaction2's label_map_*.txt); without
it the class names are the label numbers "0", "1", ... up to the largest label listed.

Writes into --out: train.jsonl, val.jsonl and classes.json. The record's video is the path as listed
(for rawframes, the frame folder); --frame_fps F adds "fps": F to every record (rawframes only: a
folder of images has no frame rate of its own). A listed video (file) or frame folder (directory)
absent from disk stops the conversion unless --allow-missing.
"""

import argparse
import os
import sys

# make `prepare.records` importable both as `python prepare/mmaction.py` and as `import prepare.mmaction`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import (add_record_options, print_video_root, report_missing, report_problems,  # noqa: E402
                             write_splits)

# format -> (columns per line, how a line reads, what it cannot hold)
FORMATS = {
    "videos": (2, "'<path> <label>'", "one label per clip: multi-label lists are not supported"),
    "rawframes": (3, "'<frame_dir> <total_frames> <label>'", "lists with a start offset column are not supported"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_list", required=True, help="mmaction2 list of the training clips")
    p.add_argument("--val_list", required=True, help="mmaction2 list of the validation (or test) clips")
    p.add_argument("--root", required=True, help="folder the train list's paths are relative to (data_prefix)")
    p.add_argument("--val_root", help="folder the val list's paths are relative to (default: --root)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--classes", help="class names, one per line, the first naming label 0 (default: the label numbers)")
    p.add_argument("--format", choices=["auto", "videos", "rawframes"], default="auto",
                   help="list format; auto: 2 columns = videos, 3 = rawframes")
    p.add_argument("--frame_fps", type=float, help="rawframes only: the frame rate of the extracted frames, "
                                                   "written as each record's fps")
    add_record_options(p)
    return p.parse_args(argv)


def read_lines(path, option):
    """(line number, stripped text) of each non-blank line of the file given as `option`."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; check {option}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not UTF-8 text ({e})")


def read_names(path, problems):
    """--classes: one name per line, line n naming label n - 1. A blank line in the middle would shift every
    label after it, and an "<id> <name>" file (UCF101's classInd.txt) would be read as names, so both
    are errors rather than guesses."""
    lines = read_lines(path, "--classes")
    numbered = all(len(line.split()) > 1 and line.split()[0].isdecimal() for _, line in lines)
    if lines and numbered:
        problems.append(f"{path}:{lines[0][0]}: every line is '<id> <name>' ({lines[0][1]!r}); --classes wants "
                        f"just the names, one per line, the first naming label 0")
    numbers = [n for n, _ in lines]
    if numbers != list(range(1, len(numbers) + 1)):
        blank = next(i for i, n in enumerate(numbers, start=1) if n != i)
        problems.append(f"{path}:{blank}: blank line; line n names label n - 1, so no line may be left empty")
    names = [line for _, line in lines]
    seen = {}
    for n, name in lines:
        if name in seen:
            problems.append(f"{path}:{n}: class {name!r} appears twice (also on line {seen[name]})")
        seen.setdefault(name, n)
    return names


def read_list(path, option, fmt, problems):
    """One mmaction2 list -> (its format, [(line, path, label)]); fmt "auto" takes the first line's
    column count. Each bad line is added to `problems` as "file:line: ..."."""
    lines = read_lines(path, option)
    if not lines:
        problems.append(f"{path}: no clips listed")
        return None, []
    if fmt == "auto":
        columns = len(lines[0][1].split())
        fmt = next((name for name, (count, _, _) in FORMATS.items() if count == columns), None)
        if fmt is None:
            problems.append(f"{path}:{lines[0][0]}: {columns} columns; expected {FORMATS['videos'][1]} (videos) or "
                            f"{FORMATS['rawframes'][1]} (rawframes), got {lines[0][1]!r}")
            return None, []
    count, spelling, limit = FORMATS[fmt]
    entries = []
    for n, line in lines:
        parts = line.split()
        if len(parts) != count:
            problems.append(f"{path}:{n}: expected {spelling} like the lines before ({limit}), got {line!r}")
            continue
        if fmt == "rawframes" and not (parts[1].isdecimal() and int(parts[1]) > 0):
            problems.append(f"{path}:{n}: total_frames {parts[1]!r} is not a positive whole number")
            continue
        if not (parts[-1].isascii() and parts[-1].isdecimal()):
            problems.append(f"{path}:{n}: label {parts[-1]!r} is not a class id (a whole number from 0)")
            continue
        entries.append((n, parts[0], int(parts[-1])))
    return fmt, entries


def main(argv=None):
    args = parse_args(argv)
    roots = {"train": args.root, "val": args.val_root or args.root}
    for option, root in [("--root", args.root), ("--val_root", args.val_root)]:
        if root is not None and not os.path.isdir(root):
            raise SystemExit(f"{root}: not a folder; {option} must be the folder the list's paths are relative to")
    if args.frame_fps is not None and not args.frame_fps > 0:
        raise SystemExit(f"--frame_fps {args.frame_fps}: must be a positive frame rate")

    # both lists and the names read before any error is shown, so one run lists every bad line
    problems, formats, lists = [], {}, {}
    for split, path in [("train", args.train_list), ("val", args.val_list)]:
        formats[split], lists[split] = read_list(path, f"--{split}_list", args.format, problems)
    names = read_names(args.classes, problems) if args.classes else None
    if formats["train"] and formats["val"] and formats["train"] != formats["val"]:
        problems.append(f"{args.val_list}: a {formats['val']} list, but {args.train_list} is a {formats['train']} "
                        f"list; convert matching lists")
    if names is not None:
        for split, path in [("train", args.train_list), ("val", args.val_list)]:
            problems += [f"{path}:{n}: label {label} is outside the {len(names)} classes of {args.classes} "
                         f"(labels 0..{len(names) - 1})" for n, _, label in lists[split] if label >= len(names)]
    report_problems(problems)
    if args.frame_fps is not None and formats["train"] != "rawframes":
        raise SystemExit(f"--frame_fps: only for rawframes lists; {args.train_list} is a videos list, whose "
                         f"files carry their own frame rate")
    if names is None:
        names = [str(i) for i in range(1 + max(label for entries in lists.values() for _, _, label in entries))]
        print(f"no --classes: the {len(names)} class names are the label numbers 0..{len(names) - 1}")

    # a frame folder is a directory, a video a file: anything else at the path counts as missing
    exists = os.path.isdir if formats["train"] == "rawframes" else os.path.isfile
    missing = [os.path.join(roots[split], video) for split, entries in lists.items() for _, video, _ in entries
               if not exists(os.path.join(roots[split], video))]
    report_missing(missing, args.allow_missing)
    missing = set(missing)
    splits = {split: [(video, label) for _, video, label in entries if os.path.join(roots[split], video) not in missing]
              for split, entries in lists.items()}
    fields = {"fps": args.frame_fps} if args.frame_fps is not None else None
    write_splits(args.out, splits, names, args.template, args.seed, fields)
    if formats["train"] == "rawframes" and args.frame_fps is None:
        print("the records' frame folders have no fps: give the frame rate as frame_fps in the dataset entry, "
              "or run again with --frame_fps F")
    if roots["val"] == roots["train"]:
        print_video_root(roots["train"])
    else:
        print_video_root(roots["train"], "the train dataset's video_root")
        print_video_root(roots["val"], "the eval dataset's video_root")


if __name__ == "__main__":
    main()
