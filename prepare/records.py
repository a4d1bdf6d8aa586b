"""Shared pieces of the dataset converters: phrasings, the record layout, atomic writes, and the
missing-file policy.

usage (from a converter in prepare/):
    splits = {"train": [("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0), ...], "val": [...]}
    write_dataset(out, root, splits, class_names, template, seed, allow_missing)
or piece by piece: make_record, report_missing, report_problems, write_splits, write_jsonl,
write_classes, print_video_root; add_record_options gives a converter its --template/--seed options.
"""

import json
import os
import random
import sys

# The 15 question/answer pairs of IVCP's UCF101 files (ivcp_ucf101_*.json, from the
# IVCP LLaMA-Factory fork), pair i = (QUESTIONS[i], ANSWERS[i]). Pair 0 is the fixed phrasing.
# Each question starts with "<video>" (where the video goes); each answer holds "<ACT>" exactly once
# (the token whose hidden state is classified).
QUESTIONS = [
    "<video>What action is being performed in this video?",
    "<video>What is the person doing in this video?",
    "<video>Can you identify the action in this video?",
    "<video>Classify the action shown in this video.",
    "<video>Describe the activity shown in this video.",
    "<video>Please recognize the action in this video clip.",
    "<video>Identify the action performed in this video.",
    "<video>What is the main action in this video clip?",
    "<video>Briefly describe the action captured in this video.",
    "<video>Watch the video and tell me what action is being done.",
    "<video>What activity is taking place in the video?",
    "<video>What kind of action can you observe in this video?",
    "<video>What is happening in this video?",
    "<video>What movement or action do you see in this video?",
    "<video>Tell me what action is happening in this video.",
]
ANSWERS = [
    "The action being performed is <ACT>.",
    "The person is doing <ACT>.",
    "Yes, the action is <ACT>.",
    "This video shows <ACT>.",
    "The activity shown in this video is <ACT>.",
    "The recognized action is <ACT>.",
    "The action performed is <ACT>.",
    "The main action is <ACT>.",
    "The action captured is <ACT>.",
    "The action being done is <ACT>.",
    "The activity taking place is <ACT>.",
    "I can observe <ACT> in this video.",
    "What is happening is <ACT>.",
    "I see <ACT> in this video.",
    "The action happening in this video is <ACT>.",
]
# The fixed phrasing (pair 0): what predict.py, the benchmarks and the synthetic demo use.
DEFAULT_MESSAGES = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": ANSWERS[0]}]
assert len(QUESTIONS) == len(ANSWERS)
assert all(q.startswith("<video>") for q in QUESTIONS)
assert all(a.count("<ACT>") == 1 for a in ANSWERS)

# How many missing paths report_missing prints before it only counts the rest (a wrong --root makes
# every file missing, and ten thousand lines would bury the message).
MAX_MISSING_SHOWN = 20


def add_record_options(parser, allow_missing=True, seed_help="seed of the phrasing draw"):
    """The options every converter shares: --template, --seed and (unless the converter has its own
    missing-file policy) --allow-missing."""
    parser.add_argument("--template", choices=["varied", "fixed"], default="varied",
                        help="varied: one of 15 phrasings per record, drawn from --seed; fixed: always the first")
    if allow_missing:
        parser.add_argument("--allow-missing", action="store_true", help="skip listed videos absent from --root")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def make_record(video: str, label: int | None, rng: random.Random | None = None) -> dict:
    """One sharegpt record; rng=None takes the fixed phrasing (pair 0); label=None (an unlabelled
    test split) leaves out the action_label key."""
    i = rng.randrange(len(QUESTIONS)) if rng is not None else 0
    record = {
        "messages": [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": ANSWERS[i]}],
        "videos": [video],
    }
    if label is not None:
        record["action_label"] = int(label)
    return record


def write_atomic(path, text: str):
    # write then rename, so an interrupted run never leaves a half-written file behind
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_classes(path, names):
    write_atomic(path, json.dumps(list(names), ensure_ascii=False, indent=1) + "\n")


def report_missing(missing: list[str], allow_missing: bool):
    """Print one summary of the listed-but-absent videos; stop unless the user chose to skip them."""
    if not missing:
        return
    print(f"{len(missing)} listed video file(s) not found on disk:", file=sys.stderr)
    for path in missing[:MAX_MISSING_SHOWN]:
        print(f"  {path}", file=sys.stderr)
    if len(missing) > MAX_MISSING_SHOWN:
        print(f"  ... and {len(missing) - MAX_MISSING_SHOWN} more", file=sys.stderr)
    if not allow_missing:
        raise SystemExit(
            f"{len(missing)} listed video file(s) are missing (listed above): check --root, "
            f"or pass --allow-missing to skip them"
        )
    print(f"skipping the {len(missing)} missing video(s) (--allow-missing)", file=sys.stderr)


def report_problems(problems: list[str]):
    """Stop with every problem of the input at once ("file:line: what is wrong"), so one run shows the
    user all there is to fix; the first MAX_MISSING_SHOWN in full, then a count."""
    if not problems:
        return
    if len(problems) == 1:
        raise SystemExit(problems[0])
    shown = problems[:MAX_MISSING_SHOWN]
    more = [f"... and {len(problems) - MAX_MISSING_SHOWN} more"] if len(problems) > MAX_MISSING_SHOWN else []
    raise SystemExit("\n".join([f"{len(problems)} problems in the input; fix them and run again:", *shown, *more]))


def write_splits(out, splits, names, template, seed, fields=None):
    """splits: {"train": [(video path, label or None), ...], ...}, every entry to be written ->
    out/<split>.jsonl and out/classes.json. fields: extra keys put into every record (e.g. "fps"), or a
    function of the video path giving them (e.g. "fps" for frame folders only)."""
    # one generator for the whole run, in split order, so the same seed gives the same files
    rng = random.Random(seed) if template == "varied" else None
    for split, entries in splits.items():
        records = [{**make_record(v, label, rng), **(fields(v) if callable(fields) else fields or {})}
                   for v, label in entries]
        write_jsonl(os.path.join(out, f"{split}.jsonl"), records)
        print(f"wrote {os.path.join(out, split + '.jsonl')}: {len(records)} records")
    write_classes(os.path.join(out, "classes.json"), names)
    print(f"wrote {os.path.join(out, 'classes.json')}: {len(names)} classes")


def print_video_root(root, what="the dataset's video_root"):
    print(f"video_root: {os.path.abspath(root)}  (use this as {what} in a config)")


def write_dataset(out, root, splits, names, template, seed, allow_missing):
    """splits: {"train": [(video path relative to root, label or None), ...], ...} -> out/<split>.jsonl
    and out/classes.json, after one missing-file report covering every split."""
    missing = [os.path.join(root, v) for entries in splits.values() for v, _ in entries
               if not os.path.isfile(os.path.join(root, v))]
    report_missing(missing, allow_missing)
    missing = set(missing)
    kept = {split: [(v, label) for v, label in entries if os.path.join(root, v) not in missing]
            for split, entries in splits.items()}
    write_splits(out, kept, names, template, seed)
    print_video_root(root)
