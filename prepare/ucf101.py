"""Convert UCF101 (official videos and split lists) into actcls records.

usage: python prepare/ucf101.py --root UCF-101 --splits ucfTrainTestlist --split 1 --out data/ucf101
                                [--template varied|fixed] [--allow-missing] [--seed 0]

Reads UCF-101/<Class>/v_<Class>_gXX_cYY.avi and ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt.
Writes into --out: train.jsonl (trainlist0N), val.jsonl (testlist0N, the official test split) and
classes.json (the 101 names in classInd order; label = classInd id - 1). Video paths are written
relative to --root, exactly as the lists spell them, so a config sets video_root to the absolute --root.
Split 1 gives 9,537 / 3,783 records, split 2 9,586 / 3,734, split 3 9,624 / 3,696.
"""

import argparse
import os
import sys

# make `prepare.records` importable both as `python prepare/ucf101.py` and as `import prepare.ucf101`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import write_dataset  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description="Convert UCF101 into actcls records.")
    p.add_argument("--root", required=True, help="folder holding <Class>/v_<Class>_gXX_cYY.avi")
    p.add_argument("--splits", required=True, help="folder holding classInd.txt, trainlist0N.txt, testlist0N.txt")
    p.add_argument("--split", type=int, choices=[1, 2, 3], default=1, help="official split number")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--template", choices=["varied", "fixed"], default="varied",
                   help="varied: one of 15 phrasings per record, drawn from --seed; fixed: always the first")
    p.add_argument("--allow-missing", action="store_true", help="skip listed videos absent from --root")
    p.add_argument("--seed", type=int, default=0, help="seed of the phrasing draw")
    return p.parse_args(argv)


def read_lines(path):
    """(line number, stripped text) of each non-blank line; universal newlines take care of CRLF."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; --splits must be the folder with classInd.txt and the split lists")
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def read_class_ind(path):
    """classInd.txt ("1 ApplyEyeMakeup" per line, ids 1-based) -> class names, index = id - 1."""
    names = {}
    for n, line in read_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdecimal():
            raise SystemExit(f"{path}:{n}: expected '<id> <ClassName>' (e.g. '1 ApplyEyeMakeup'), got {line!r}")
        class_id, name = int(parts[0]), parts[1]
        if class_id in names or name in names.values():
            raise SystemExit(f"{path}:{n}: id {class_id} or class {name!r} appears twice")
        names[class_id] = name
    if sorted(names) != list(range(1, len(names) + 1)):
        raise SystemExit(f"{path}: class ids must be 1..{len(names)} with none skipped, got {sorted(names)}")
    return [names[i] for i in range(1, len(names) + 1)]


def label_of_video(path, n, video, class_ids):
    """The label of '<Class>/<file>.avi', from its folder part (file names may spell the class
    differently: HandstandPushups/v_HandStandPushups_g01_c01.avi)."""
    folder, slash, filename = video.partition("/")
    if not slash or not filename or "/" in filename:
        raise SystemExit(f"{path}:{n}: expected a video path '<ClassName>/<file>.avi', got {video!r}")
    if folder not in class_ids:
        raise SystemExit(f"{path}:{n}: class folder {folder!r} is not in classInd.txt")
    return class_ids[folder]


def read_train_list(path, class_ids):
    """trainlist0N.txt ("<Class>/<file>.avi <id>") -> [(video, label)], checking id against the folder."""
    entries = []
    for n, line in read_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdecimal():
            raise SystemExit(f"{path}:{n}: expected '<ClassName>/<file>.avi <class id>', got {line!r}")
        video, label = parts[0], label_of_video(path, n, parts[0], class_ids)
        if int(parts[1]) != label + 1:
            raise SystemExit(f"{path}:{n}: class id {parts[1]} disagrees with classInd.txt, which gives "
                             f"{label + 1} for folder {video.split('/')[0]!r}; fix the list or classInd.txt")
        entries.append((video, label))
    return entries


def read_test_list(path, class_ids):
    """testlist0N.txt ("<Class>/<file>.avi", no id) -> [(video, label)], label from the folder."""
    entries = []
    for n, line in read_lines(path):
        parts = line.split()
        if len(parts) != 1:
            raise SystemExit(f"{path}:{n}: expected one video path '<ClassName>/<file>.avi', got {line!r}")
        entries.append((parts[0], label_of_video(path, n, parts[0], class_ids)))
    return entries


def main(argv):
    args = parse_args(argv)
    if not os.path.isdir(args.root):
        raise SystemExit(f"{args.root}: not a folder; --root must hold the UCF101 class folders")
    names = read_class_ind(os.path.join(args.splits, "classInd.txt"))
    class_ids = {name: i for i, name in enumerate(names)}
    splits = {
        "train": read_train_list(os.path.join(args.splits, f"trainlist0{args.split}.txt"), class_ids),
        "val": read_test_list(os.path.join(args.splits, f"testlist0{args.split}.txt"), class_ids),
    }
    write_dataset(args.out, args.root, splits, names, args.template, args.seed, args.allow_missing)


if __name__ == "__main__":
    main(sys.argv[1:])
