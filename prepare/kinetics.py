"""Convert Kinetics-400/600/700 (official CSVs and downloaded clips) into actcls records.

usage: python prepare/kinetics.py --root kinetics400 --out data/kinetics400 [--annotations DIR]
                                  [--template varied|fixed] [--seed 0]

Reads the official CSVs in --annotations (default <root>/annotations): train.csv, validate.csv (or
val.csv) and, if present, test.csv. Columns are found by header name: label, youtube_id, time_start,
time_end; others (split, Kinetics-700-2020's is_cc) are ignored, and a test.csv without a label
column gives records without action_label. Each row is the clip file
<youtube_id>_<time_start:06d>_<time_end:06d>.mp4, found in <root>/train, <root>/val (or
<root>/validate) and <root>/test, either flat or in class folders (<root>/train/<label>/<clip>.mp4,
the label spelled with spaces or with "_" for each space).

Writes into --out: train.jsonl, val.jsonl (the validation CSV), test.jsonl (only when test.csv and
<root>/test both exist), classes.json (the train CSV's labels, sorted; label = index) and
missing.txt. A real download lacks 5-10% of the clips (videos since taken off YouTube), so a listed
clip not on disk is left out, counted in the summary and listed in missing.txt (one line per clip:
split<TAB>clip file<TAB>label<TAB>csv:line), not an error. Video paths are relative to --root
("train/abseiling/<clip>.mp4" or "train/<clip>.mp4"), so a config sets video_root to the absolute --root.
"""

import argparse
import csv
import os
import sys

# make `prepare.records` importable both as `python prepare/kinetics.py` and as `import prepare.kinetics`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import (add_record_options, print_video_root, report_problems, write_atomic,  # noqa: E402
                             write_splits)

# output split -> (accepted CSV names, accepted clip folder names), first found wins
SPLITS = {
    "train": (["train.csv"], ["train"]),
    "val": (["validate.csv", "val.csv"], ["val", "validate"]),
    "test": (["test.csv"], ["test"]),
}
TIME_COLUMNS = ("time_start", "time_end")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding train/, val/ (or validate/) and optionally test/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--annotations", help="folder holding train.csv, validate.csv (or val.csv), test.csv "
                                         "(default: <root>/annotations)")
    add_record_options(p, allow_missing=False)  # missing clips are expected here: listed, never fatal
    return p.parse_args(argv)


def first_existing(folder, names, isdir=False):
    """The first of folder/<name> that exists (as a folder when isdir), or None."""
    exists = os.path.isdir if isdir else os.path.isfile
    return next((os.path.join(folder, n) for n in names if exists(os.path.join(folder, n))), None)


def read_csv(path, classes, labelled, problems):
    """One official CSV -> [(line, label or None, clip file name)], its bad rows added to `problems`
    as "file:line: ..." so that all of them are reported together."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
            return read_rows(path, csv.reader(f), classes, labelled, problems)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not UTF-8 text ({e}); is it the official CSV?")


def read_rows(path, reader, classes, labelled, problems):
    """classes=None (train.csv): any label goes; otherwise a label must be one of `classes`.
    labelled=False (test.csv, unlabelled in some releases): a missing label gives no action_label."""
    header = [name.strip() for name in next(reader, [])]
    wanted = ("label", "youtube_id", *TIME_COLUMNS) if labelled else ("youtube_id", *TIME_COLUMNS)
    absent = [name for name in wanted if name not in header]
    if absent:
        problems.append(f"{path}:1: the header lacks column(s) {', '.join(absent)}; expected the official "
                        f"'label,youtube_id,time_start,time_end,split', got {','.join(header)!r}")
        return []
    col = {name: header.index(name) for name in header}
    rows = []
    for row in reader:
        n = reader.line_num  # the physical line, right even after a quoted multi-line field
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(f"{path}:{n}: {len(row)} columns where the header has {len(header)}: {','.join(row)!r}")
            continue
        youtube_id = row[col["youtube_id"]].strip()
        times = [row[col[name]].strip() for name in TIME_COLUMNS]
        label = row[col["label"]].strip() if "label" in col else ""
        bad_times = [f"{name}={t!r}" for name, t in zip(TIME_COLUMNS, times) if not (t.isascii() and t.isdecimal())]
        if bad_times:
            problems.append(f"{path}:{n}: time not a whole number of seconds: {', '.join(bad_times)}")
        if not youtube_id:
            problems.append(f"{path}:{n}: empty youtube_id")
        if not label and labelled:
            problems.append(f"{path}:{n}: empty label")
        elif classes is not None and label and label not in classes:
            problems.append(f"{path}:{n}: label {label!r} is not a class of train.csv; "
                            f"are the CSVs from the same Kinetics release?")
        if not bad_times and youtube_id:
            rows.append((n, label or None, f"{youtube_id}_{int(times[0]):06d}_{int(times[1]):06d}.mp4"))
    return rows


def index_clips(root, folder):
    """file name -> [its paths relative to root], over root/folder and its class sub-folders: one
    listing instead of a stat per row (a Kinetics split folder holds up to 500k clips)."""
    found = {}
    with os.scandir(os.path.join(root, folder)) as entries:
        for entry in entries:
            if entry.is_file():
                found.setdefault(entry.name, []).append(f"{folder}/{entry.name}")
            elif entry.is_dir():
                with os.scandir(entry.path) as clips:
                    for clip in clips:
                        if clip.is_file():
                            found.setdefault(clip.name, []).append(f"{folder}/{entry.name}/{clip.name}")
    return found


def locate(found, name, label):
    """The clip's path; when the same file sits in several class folders, the one named after its
    label (with spaces, or with "_" for them)."""
    paths = found.get(name, [])
    if len(paths) > 1 and label is not None:
        for spelling in (label, label.replace(" ", "_")):
            for path in paths:
                if path.split("/")[-2] == spelling:
                    return path
    return paths[0] if paths else None


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.root):
        raise SystemExit(f"{args.root}: not a folder; --root must hold the train/ and val/ clip folders")
    annotations = args.annotations or os.path.join(args.root, "annotations")
    csvs = {split: first_existing(annotations, names) for split, (names, _) in SPLITS.items()}
    absent = [" or ".join(SPLITS[split][0]) for split in ("train", "val") if csvs[split] is None]
    if absent:
        raise SystemExit(f"{annotations}: no {' and no '.join(absent)}; --annotations must be the folder with "
                         f"the official Kinetics CSVs (default: <root>/annotations)")

    # every CSV read before any error is shown, so one run lists every bad row
    problems = []
    rows = {"train": read_csv(csvs["train"], None, True, problems)}
    names = sorted({label for _, label, _ in rows["train"]})
    for split in ("val", "test"):
        if csvs[split] is not None:  # no classes to check against when train.csv gave none
            rows[split] = read_csv(csvs[split], set(names) or None, split == "val", problems)
    if not problems and not names:
        problems.append(f"{csvs['train']}: no clips listed")
    report_problems(problems)

    folders = {split: first_existing(args.root, SPLITS[split][1], isdir=True) for split in rows}
    for split in [s for s in ("train", "val") if folders[s] is None]:
        problems.append(f"{args.root}: no {' or '.join(f'{d}/' for d in SPLITS[split][1])} folder for "
                        f"{os.path.basename(csvs[split])}; --root must hold the downloaded clips")
    if "test" in rows and folders["test"] is None:
        print(f"{csvs['test']}: no {args.root}/test/ folder, so no test.jsonl")
        del rows["test"]
    report_problems(problems)

    class_ids = {name: i for i, name in enumerate(names)}
    splits, missing = {}, []
    for split, listed in rows.items():
        found, csv_name = index_clips(args.root, os.path.basename(folders[split])), os.path.basename(csvs[split])
        splits[split] = []
        for n, label, name in listed:
            path = locate(found, name, label)
            if path is None:
                missing.append((split, name, label or "", f"{csv_name}:{n}"))
            else:
                splits[split].append((path, None if label is None else class_ids[label]))
        lost = len(listed) - len(splits[split])
        print(f"{csv_name}: {len(listed)} clips listed, {len(splits[split])} found, {lost} missing")
        if listed and not splits[split]:  # a wrong --root, not a partial download
            problems.append(f"{folders[split]}: none of the {len(listed)} clips of {csvs[split]} is there "
                            f"(e.g. {listed[0][2]}); check --root")
    report_problems(problems)

    missing_file = os.path.join(args.out, "missing.txt")
    write_atomic(missing_file, "".join("\t".join(m) + "\n" for m in missing))
    total = sum(len(listed) for listed in rows.values())
    print(f"wrote {missing_file}: {len(missing)} of {total} listed clips not found "
          f"({len(missing) / total:.1%}), left out")
    write_splits(args.out, splits, names, args.template, args.seed)
    print_video_root(args.root)


if __name__ == "__main__":
    main()
