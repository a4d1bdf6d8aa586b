"""Convert HMDB51 (official videos and its three 70/30 splits) into actcls records.

usage: python prepare/hmdb51.py --root hmdb51_org --splits testTrainMulti_7030_splits --split 1 --out data/hmdb51
                                [--template varied|fixed] [--allow-missing] [--seed 0]

Reads hmdb51_org/<class>/<clip>.avi (hmdb51_org.rar, each class's .rar unpacked in place) and
testTrainMulti_7030_splits/<class>_test_split<K>.txt (test_train_splits.rar): one file per class and
split, one line "<clip>.avi <id>" per clip of the class, id 1 = train, 2 = test, 0 = not used in split K.
Writes into --out: train.jsonl (id 1), val.jsonl (id 2, the official test split) and classes.json
(the 51 class names of the split files, sorted; label = index). Video paths are "<class>/<clip>.avi",
relative to --root, so a config sets video_root to the absolute --root.
Each split gives 3,570 / 1,530 records (70 / 30 per class).
"""

import argparse
import os
import re
import sys

# make `prepare.records` importable both as `python prepare/hmdb51.py` and as `import prepare.hmdb51`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import add_record_options, report_problems, write_dataset  # noqa: E402

SPLIT_FILE = re.compile(r"(?P<cls>.+)_test_split(?P<k>[123])\.txt")
IDS = {"1": "train", "2": "val"}  # 0: not used in this split


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding <class>/<clip>.avi (hmdb51_org)")
    p.add_argument("--splits", required=True,
                   help="folder holding <class>_test_split<K>.txt (testTrainMulti_7030_splits)")
    p.add_argument("--split", type=int, choices=[1, 2, 3], default=1, help="official split number K")
    p.add_argument("--out", required=True, help="output folder")
    add_record_options(p)
    return p.parse_args(argv)


def split_files(folder, k):
    """class name -> its <class>_test_split<k>.txt; the class names are read off the file names."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: not a folder; --splits must be the folder with <class>_test_split<K>.txt "
                         f"(testTrainMulti_7030_splits)")
    files = {}
    for name in os.listdir(folder):
        match = SPLIT_FILE.fullmatch(name)
        if match and int(match["k"]) == k:
            files[match["cls"]] = os.path.join(folder, name)
    if not files:
        raise SystemExit(f"{folder}: no <class>_test_split{k}.txt files; --splits must be the folder "
                         f"testTrainMulti_7030_splits")
    return files


def read_split_file(path, cls, label, problems):
    """<class>_test_split<k>.txt -> {"train": [(video, label)], "val": [...]}; each bad line is added
    to `problems` as "file:line: ..."."""
    entries, seen = {"train": [], "val": []}, {}
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            lines = [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not UTF-8 text ({e}); is it an official split file?")
    for n, line in lines:
        parts = line.split()  # the real files end each line with a space
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            problems.append(f"{path}:{n}: expected '<clip>.avi <0|1|2>' (0 unused, 1 train, 2 test), got {line!r}")
            continue
        clip, split_id = parts
        if clip in seen:
            problems.append(f"{path}:{n}: {clip} is listed twice (also on line {seen[clip]})")
            continue
        seen[clip] = n
        if split_id in IDS:
            entries[IDS[split_id]].append((f"{cls}/{clip}", label))
    return entries


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.root):
        raise SystemExit(f"{args.root}: not a folder; --root must hold the HMDB51 class folders (hmdb51_org)")
    files = split_files(args.splits, args.split)
    names = sorted(files)
    splits, problems = {"train": [], "val": []}, []
    for label, cls in enumerate(names):
        for split, entries in read_split_file(files[cls], cls, label, problems).items():
            splits[split] += entries
    report_problems(problems)
    write_dataset(args.out, args.root, splits, names, args.template, args.seed, args.allow_missing)


if __name__ == "__main__":
    main()
