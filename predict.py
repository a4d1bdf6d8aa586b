"""Classify video files with a trained checkpoint.

    python predict.py --checkpoint runs/synthetic/checkpoints/step_0000700 clip1.mp4 clip2.webm
    python predict.py --checkpoint CKPT videos/ --top_k 3 --json        # a folder, machine-readable
    python predict.py --checkpoint CKPT data/sthsthv2/test.jsonl        # records (labels optional)

Frames are sampled as in evaluation (segment centres, the checkpoint's video settings); the prompt
is the fixed training phrasing unless the input is a .jsonl of records, whose own messages are used.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch
import yaml

from data import Collator, Sample, VideoDataset, VideoSettings, load_samples
from model import build_classifier, load_weights

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
DEFAULT_MESSAGES = [{"role": "user", "content": "<video>What action is being performed in this video?"},
                    {"role": "assistant", "content": "The action being performed is <ACT>."}]


def load_classifier(checkpoint, device):
    """Rebuilds the model from the checkpoint's own config and loads its weights and class names."""
    from train import Config, head_sizes  # the schema lives with the training script

    with open(os.path.join(checkpoint, "config.yaml")) as f:
        cfg = Config(**yaml.safe_load(f))
    cfg = dataclasses.replace(cfg, gradient_checkpointing=False, action_decoder_path=None)
    processor, model = build_classifier(cfg, head_sizes(cfg))
    load_weights(model, checkpoint)
    classes_file = os.path.join(checkpoint, "classes.json")
    classes = json.load(open(classes_file)) if os.path.exists(classes_file) else {}
    for space, head in model.heads.items():
        names = classes.get(space)
        if names is not None and len(names) != head.config["num_classes"]:
            raise SystemExit(f"{classes_file}: {len(names)} class names for label space {space!r}, "
                             f"but its head has {head.config['num_classes']} outputs")
    return cfg, processor, model.to(device).eval(), classes


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
            raise SystemExit(f"{path}: no such file or folder")
    if not samples:
        raise SystemExit(f"no videos found in {inputs}")
    return samples


@torch.no_grad()
def predict(model, processor, samples, cfg, label_space, top_k, batch_size, device):
    """Yields (sample, [(class_index, probability), ...] or None for an unreadable video), in input
    order. Sampling and views as in evaluation: softmax probabilities averaged over the views."""
    from train import eval_views

    settings = VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                             cfg.video_max_pixels)
    views = eval_views(cfg)
    dataset = VideoDataset(samples, settings)
    collate = Collator(processor, model.act_token_id)
    for start in range(0, len(samples), batch_size):
        chunk = range(start, min(start + batch_size, len(samples)))
        probs, valid = 0, None
        for view in views:
            batch = collate([dataset[(i, 0, False, view)] for i in chunk])
            for message in batch["skipped"] if view == views[0] else []:
                print(f"unreadable video: {message}", file=sys.stderr)
            inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
            probs = probs + model(label_space, **inputs).float().softmax(-1).cpu() / len(views)
            valid = batch["valid"]
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for row, i in enumerate(chunk):
            yield samples[i], list(zip(top.indices[row].tolist(), top.values[row].tolist())) if valid[row] else None


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

    device = torch.device(args.device)
    cfg, processor, model, classes = load_classifier(args.checkpoint, device)
    space = args.label_space if args.label_space is not None else ("default" if "default" in model.heads else next(iter(model.heads)))
    if space not in model.heads:
        raise SystemExit(f"--label_space {space!r}: the checkpoint has heads {list(model.heads)}")
    names = classes.get(space, [str(i) for i in range(model.heads[space].config["num_classes"])])
    samples = collect_samples(args.inputs, space, len(names))
    for sample, top in predict(model, processor, samples, cfg, space, args.top_k, args.batch_size, device):
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
