"""Classify video files with a trained checkpoint.

    python predict.py --checkpoint runs/synthetic/checkpoints/step_0000700 clip1.mp4 clip2.webm
    python predict.py --checkpoint CKPT videos/ --top_k 3 --json        # a folder, machine-readable
    python predict.py --checkpoint CKPT data/sthsthv2/test.jsonl        # records (labels optional)

Frames are sampled as in evaluation (segment centres, the checkpoint's video settings); the prompt
is the fixed training phrasing unless the input is a .jsonl of records, whose own messages are used.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import numpy as np
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
def view_probabilities(model, loader, num_views, autocast, device):
    """Softmax probabilities averaged over the views, for every sample the loader yields (each
    sample once per view): {index: (probabilities, label or -1, record, readable)}. Also returns
    the messages of unreadable videos (another sample stood in for them; they count nowhere)."""
    was_training = model.training
    model.eval()
    out, skipped = {}, set()
    for batch in loader:
        with autocast:
            logits = model(batch["label_space"], **{k: v.to(device) for k, v in batch["inputs"].items()}).float()
        probs = logits.softmax(-1).cpu().double() / num_views
        for row, index in enumerate(batch["index"].tolist()):
            total = out[index][0] + probs[row] if index in out else probs[row]
            label = batch["labels"][row].item()
            out[index] = (total, label if label >= 0 else -1, batch["sources"][row], bool(batch["valid"][row]))
        skipped.update(batch["skipped"])
    model.train(was_training)
    return out, sorted(skipped)


def predict(model, processor, samples, cfg, label_space, top_k, batch_size, device):
    """Yields (sample, [(class_index, probability), ...] or None for an unreadable video), in input
    order, sampled and viewed exactly as in evaluation."""
    from train import eval_views

    settings = VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                             cfg.video_max_pixels)
    dataset, views = VideoDataset(samples, settings), eval_views(cfg)
    for start in range(0, len(samples), batch_size):
        chunk = range(start, min(start + batch_size, len(samples)))
        loader = [Collator(processor, model.act_token_id)([dataset[(i, 0, False, view)] for i in chunk])
                  for view in views]
        probs, skipped = view_probabilities(model, loader, len(views), contextlib.nullcontext(), device)
        for message in skipped:
            print(f"unreadable video: {message}", file=sys.stderr)
        for i in chunk:
            p, _, _, readable = probs[i]
            top = p.topk(min(top_k, len(p)))
            yield samples[i], list(zip(top.indices.tolist(), top.values.tolist())) if readable else None


# ---------------------------------------------------------------------------------------------------
# The evaluation report of `train.py --eval_only`: eval.json, predictions.jsonl, confusion PNGs

def confusion_image(confusion, names):
    """The confusion matrix as an RGB array: rows = true class, columns = predicted (same order),
    normalised per row, classes sorted by accuracy (worst first, so the problems sit together at
    the top), each row labelled "position name accuracy", columns numbered by the same positions every
10, and a colour scale.
    The shade is the square root of the rate, so a rare confusion (0.02) still shows. Rows are 12 px:
    174 classes make a tall image, but every label stays legible."""
    from PIL import Image, ImageDraw

    rates = (confusion / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    order = np.argsort(np.diag(rates), kind="stable")
    rates = rates[order][:, order]
    n, cell, top = len(order), 12, 40
    labels = [f"{r:>3} {names[i][:40]}  {rates[r, r]:.2f}" for r, i in enumerate(order)]  # r: its column too
    title = "true class (rows, sorted by accuracy, worst first) vs predicted class (columns, same order)"
    margin = 8 + 6 * max(len(t) for t in labels)
    width = max(margin + n * cell + 90, 8 + 6 * len(title))
    image = Image.new("RGB", (width, top + max(n * cell, 11 * 24) + 20), "white")  # the scale fits too
    heat = (255 * (1 - np.sqrt(rates))).astype(np.uint8)  # white (0) .. blue (1)
    block = np.stack([heat, heat, np.full_like(heat, 255)], -1).repeat(cell, 0).repeat(cell, 1)
    image.paste(Image.fromarray(block, "RGB"), (margin, top))
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill="black")
    for r, text in enumerate(labels):
        draw.text((4, top + r * cell + 1), text, fill="black")
    for c in range(0, n, 10):  # column positions, to read a confusion off a row
        draw.text((margin + c * cell, top - 12), str(c), fill="black")
    for k in range(11):  # colour scale, in the same square-root shading
        y, rate = top + k * 24, 1 - k / 10
        shade = int(255 * (1 - np.sqrt(rate)))
        draw.rectangle([margin + n * cell + 10, y, margin + n * cell + 30, y + 22], fill=(shade, shade, 255))
        draw.text((margin + n * cell + 35, y + 6), f"{rate:.1f}", fill="black")
    return np.asarray(image)


def write_eval_outputs(cfg, mix, results, rows, skipped):
    from PIL import Image

    summary = {"checkpoint": cfg.checkpoint, "views": {"clips": cfg.eval_num_clips, "crops": cfg.eval_num_crops,
                                                       "averaging": "softmax probabilities"},
               "sampling": {k: getattr(cfg, k) for k in ("video_fps", "video_maxlen", "video_num_frames",
                                                         "video_min_pixels", "video_max_pixels")},
               "skipped_videos": skipped, "datasets": {}}
    for name, r in results.items():
        names = mix.classes.get(r["label_space"], [str(i) for i in range(len(r["confusion"]))])
        confusion = r["confusion"]
        per_class = {names[c]: {"accuracy": (confusion[c, c] / confusion[c].sum()).item(), "count": int(confusion[c].sum())}
                     for c in range(len(names)) if confusion[c].sum() > 0}
        summary["datasets"][name] = {**{k: v for k, v in r.items() if k != "confusion"}, "per_class": per_class,
                                     "confusion": confusion.long().tolist()}
        Image.fromarray(confusion_image(confusion, names)).save(os.path.join(cfg.output_dir, f"confusion_{name}.png"))
        print(f"{name}: top1 {r['top1']:.4f} top5 {r['top5']:.4f} mean class acc {r['mean_class_acc']:.4f} "
               f"loss {r['loss']:.4f} ({r['count']} samples)")
    with open(os.path.join(cfg.output_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(cfg.output_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote eval.json, predictions.jsonl and confusion_*.png to {cfg.output_dir}")



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
