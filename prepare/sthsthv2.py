"""Convert Something-Something v2 (official videos and label files) into actcls records.

usage: python prepare/sthsthv2.py --root 20bn-something-something-v2 --labels labels --out data/sthsthv2
                                  [--template varied|fixed] [--allow-missing] [--seed 0]

Reads <root>/<id>.webm and <labels>/{labels,train,validation,test}.json. Writes into --out:
train.jsonl, val.jsonl (validation.json), test.jsonl (test.json, no action_label: its labels are not
public) and classes.json (the 174 templates in official id order). The label is the official id from
labels.json, found by the record's template with its brackets removed ("Holding [something] next to
[something]" -> "Holding something next to something"). Video paths are "<id>.webm", relative to
--root, so a config sets video_root to the absolute --root.
"""

import argparse
import json
import os
import sys

# make `prepare.records` importable both as `python prepare/sthsthv2.py` and as `import prepare.sthsthv2`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import write_dataset  # noqa: E402

# output split name -> official label file (test.json has ids only)
SPLIT_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Convert Something-Something v2 into actcls records.")
    p.add_argument("--root", required=True, help="folder holding <id>.webm")
    p.add_argument("--labels", required=True, help="folder holding labels.json, train.json, validation.json, test.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--template", choices=["varied", "fixed"], default="varied",
                   help="varied: one of 15 phrasings per record, drawn from --seed; fixed: always the first")
    p.add_argument("--allow-missing", action="store_true", help="skip listed videos absent from --root")
    p.add_argument("--seed", type=int, default=0, help="seed of the phrasing draw")
    return p.parse_args(argv)


def read_json(path):
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; --labels must be the folder with labels.json, train.json, "
                         f"validation.json and test.json")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON: {e}")


def read_classes(path):
    """labels.json ({"template without brackets": "id"}) -> template names, index = official id."""
    templates = read_json(path)
    if not isinstance(templates, dict):
        raise SystemExit(f"{path}: expected an object mapping template -> id string, got {type(templates).__name__}")
    names = {}
    for template, class_id in templates.items():
        if not str(class_id).isdecimal():
            raise SystemExit(f"{path}: id {class_id!r} of template {template!r} is not a whole number")
        if int(class_id) in names:
            raise SystemExit(f"{path}: id {class_id} is given to both {names[int(class_id)]!r} and {template!r}")
        names[int(class_id)] = template
    if sorted(names) != list(range(len(names))):
        skipped = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise SystemExit(f"{path}: ids must be 0..{len(names) - 1} with none skipped "
                         f"(the id is the label); missing {skipped[:10]}")
    return [names[i] for i in range(len(names))]


def read_split(path, class_ids, labelled):
    """train/validation.json ([{"id", "template", ...}]) or test.json ([{"id"}]) -> [(video, label)]."""
    items = read_json(path)
    if not isinstance(items, list):
        raise SystemExit(f"{path}: expected a list of records, got {type(items).__name__}")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item or (labelled and "template" not in item):
            keys = '"id" and "template"' if labelled else '"id"'
            raise SystemExit(f"{path}: record {i}: expected an object with {keys}, got {str(item)[:200]}")
        label = None
        if labelled:
            template = str(item["template"]).replace("[", "").replace("]", "")
            if template not in class_ids:
                raise SystemExit(f"{path}: record {i} (id {item['id']}): template {item['template']!r} "
                                 f"(without brackets {template!r}) is not in labels.json; "
                                 f"are the label files from the same release?")
            label = class_ids[template]
        entries.append((f"{item['id']}.webm", label))
    return entries


def main(argv):
    args = parse_args(argv)
    if not os.path.isdir(args.root):
        raise SystemExit(f"{args.root}: not a folder; --root must hold the <id>.webm videos")
    names = read_classes(os.path.join(args.labels, "labels.json"))
    class_ids = {name: i for i, name in enumerate(names)}
    splits = {split: read_split(os.path.join(args.labels, filename), class_ids, labelled=split != "test")
              for split, filename in SPLIT_FILES.items()}
    write_dataset(args.out, args.root, splits, names, args.template, args.seed, args.allow_missing)


if __name__ == "__main__":
    main(sys.argv[1:])
