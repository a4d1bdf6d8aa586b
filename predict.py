"""Classify video files with a trained checkpoint.

    python predict.py --checkpoint runs/synthetic/checkpoints/step_0000700 clip1.mp4 clip2.webm
    python predict.py --checkpoint CKPT videos/ --top_k 3 --json        # a folder, machine-readable
    python predict.py --checkpoint CKPT data/sthsthv2/test.jsonl        # records (labels optional)

Frames are sampled as in evaluation (segment centres, the checkpoint's video settings); the prompt
is the fixed training phrasing unless the input is a .jsonl of records, whose own messages are used.
"""

import argparse
import json
import os
import sys
import typing
from contextlib import nullcontext

import torch

from config import ConfigError, head_sizes, saved_config, video_settings
from data import Collator, DataError, Sample, VideoDataset, load_samples
from evaluation import class_names, eval_views, view_probabilities
from model import CheckpointError, build_classifier, load_weights
from prepare.records import DEFAULT_MESSAGES

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
USER_ERRORS = (ConfigError, DataError, CheckpointError)  # one message and exit code 1, no traceback


class Loaded(typing.NamedTuple):
    cfg: object  # config.Config the checkpoint was trained with
    processor: object
    model: torch.nn.Module  # model.ActionClassifier, in eval mode
    classes: dict  # label_space -> class names


def load_classifier(checkpoint, device):
    """Rebuilds the model from the checkpoint's own config and loads its weights and class names."""
    if not os.path.isfile(os.path.join(checkpoint, "config.yaml")):
        raise CheckpointError(f"{checkpoint}: not a checkpoint folder (no config.yaml); pass a "
                              f"runs/NAME/checkpoints/step_NNNNNNN (or best) folder")
    cfg = saved_config(os.path.join(checkpoint, "config.yaml"))
    cfg.gradient_checkpointing, cfg.action_decoder_path = False, None  # inference; the weights come from here
    processor, model = build_classifier(cfg, head_sizes(cfg))
    load_weights(model, checkpoint)
    classes = read_classes(os.path.join(checkpoint, "classes.json"))
    for space, head in model.heads.items():
        names = classes.get(space)
        if names is not None and len(names) != head.config["num_classes"]:
            raise CheckpointError(f"{checkpoint}/classes.json: {len(names)} class names for label space {space!r}, "
                                  f"but its head has {head.config['num_classes']} outputs")
    return Loaded(cfg, processor, model.to(device).eval(), classes)


def read_classes(path):
    """A checkpoint's classes.json: {label_space: [names]}; absent means class indices as names."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            classes = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the class names ({e})") from None
    if not isinstance(classes, dict):
        raise CheckpointError(f"{path}: expected {{label_space: [class names]}}, got a {type(classes).__name__}")
    return classes


def collect_samples(inputs, label_space, num_classes):
    samples = []
    for path in inputs:
        if path.endswith((".jsonl", ".json")):
            found, bad = load_samples(path, None, num_classes, label_space, require_label=False)
            samples += found
            if bad:
                print(f"skipping {len(bad)} record(s) whose video is missing or empty:\n" + "\n".join(bad), file=sys.stderr)
        elif os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.lower().endswith(VIDEO_EXTENSIONS):
                    samples.append(Sample(os.path.join(path, name), DEFAULT_MESSAGES, None, label_space, name))
        elif os.path.isfile(path):
            samples.append(Sample(os.path.abspath(path), DEFAULT_MESSAGES, None, label_space, path))
        else:
            raise DataError(f"{path}: no such file or folder")
    if not samples:
        raise DataError(f"no videos found in {inputs}")
    return samples


def predict(loaded, samples, top_k, batch_size, device):
    """Yields (sample, [(class_index, probability), ...] or None for an unreadable video), in input
    order, sampled and viewed exactly as in evaluation."""
    dataset, views = VideoDataset(samples, video_settings(loaded.cfg)), eval_views(loaded.cfg)
    collate = Collator(loaded.processor, loaded.model.act_token_id)
    for start in range(0, len(samples), batch_size):
        chunk = range(start, min(start + batch_size, len(samples)))
        loader = [collate([dataset[(i, 0, False, view)] for i in chunk]) for view in views]
        probs, skipped = view_probabilities(loaded.model, loader, len(views), nullcontext(), device)
        for message in skipped:
            print(f"unreadable video: {message}", file=sys.stderr)
        for i in chunk:
            p, _, _, readable = probs[i]
            top = p.topk(min(top_k, len(p)))
            yield samples[i], list(zip(top.indices.tolist(), top.values.tolist())) if readable else None


# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_NNNNNNN folder")
    p.add_argument("inputs", nargs="+", help="video files, folders of videos, or .jsonl/.json record files")
    p.add_argument("--label_space", default=None, help="which head to use (default: the only one / 'default')")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per video on stdout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        classify(args)
    except USER_ERRORS as e:
        raise SystemExit(str(e)) from None


def classify(args):
    device = torch.device(args.device)
    loaded = load_classifier(args.checkpoint, device)
    heads = loaded.model.heads
    space = args.label_space if args.label_space is not None else ("default" if "default" in heads else next(iter(heads)))
    if space not in heads:
        raise ConfigError(f"--label_space {space!r}: the checkpoint has heads {list(heads)}")
    names = class_names(loaded.classes, space, heads[space].config["num_classes"])
    samples = collect_samples(args.inputs, space, len(names))
    for sample, top in predict(loaded, samples, args.top_k, args.batch_size, device):
        if top is None:
            print(json.dumps({"video": sample.video, "error": "unreadable video"}) if args.json
                  else f"{sample.video}\n  unreadable video (see the warning above)")
        elif args.json:
            print(json.dumps({"video": sample.video, "label": sample.label,
                              "top": [{"class": names[c], "index": c, "prob": round(pr, 6)} for c, pr in top]}))
        else:
            print(sample.video)
            for c, pr in top:
                print(f"  {pr:7.2%}  {names[c]}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
