"""Evaluation, shared by train.py (periodic and --eval_only) and predict.py.

    view_probabilities(model, loader, ...)   softmax probabilities averaged over the views, per sample
    evaluate(model, loader, mix, cfg, ...)   per eval dataset: loss, top-1, top-5, mean class accuracy,
                                             confusion matrix; every sample exactly once across ranks
    write_eval_outputs(...)                  eval.json, predictions.jsonl, confusion_<dataset>.png

Views: eval_num_clips temporal views (clip c of C takes the frame at (c + 0.5) / C of each segment)
times eval_num_crops spatial views (1: the whole frame; 3: start/centre/end squares).
"""

import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError, head_sizes
from data import eval_batches, make_loader


def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()


def all_reduce_sums(values, device):
    """Element-wise sums over the ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def eval_views(cfg):
    """(clip, num_clips, crop, num_crops) for every view; one (0, 1, 0, 1) by default."""
    return [(c, cfg.eval_num_clips, k, cfg.eval_num_crops)
            for c in range(cfg.eval_num_clips) for k in range(cfg.eval_num_crops)]


def class_names(classes, space, num_classes):
    """The label space's names from classes.json, else the class indices as names."""
    return classes.get(space, [str(i) for i in range(num_classes)])


def eval_loader(mix, collate, cfg, world, rank):
    """Every view of every sample, this rank's share. Built once: its workers persist from one
    evaluation to the next."""
    plan = [b for view in eval_views(cfg)
            for b in eval_batches(mix.counts, cfg.per_device_eval_batch_size, world, rank, view)]
    return make_loader(mix.dataset, plan, collate, cfg.dataloader_num_workers, cfg.seed)


def check_even_eval_batches(evals, world):
    """FSDP2: every forward all-gathers, so a rank with an extra eval batch would wait forever."""
    counts = [None] * world
    dist.all_gather_object(counts, len(evals))
    if len(set(counts)) > 1:
        raise ConfigError(f"fsdp: the ranks would run {counts} eval batches; each FSDP forward is a "
                          f"collective, so they must be equal: use an eval set whose size is a multiple "
                          f"of {world} x per_device_eval_batch_size")


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


def evaluate(model, loader, mix, cfg, device):
    """Per eval dataset: loss (of the view-averaged probabilities), top-1, top-5, mean per-class
    accuracy, count, and the confusion matrix; reduced across ranks as sums. A collective: every
    rank calls it. Returns (results by dataset name, this rank's probabilities, skipped videos of
    every rank)."""
    probs, skipped = view_probabilities(model, loader, len(eval_views(cfg)), autocast(cfg, device), device)
    sizes, results = head_sizes(cfg), {}
    for d, (name, space) in enumerate(zip(mix.names, mix.spaces)):  # the same order on every rank
        n = sizes[space]
        stats = torch.zeros(2 + n * n, dtype=torch.float64)  # loss sum, top-5 hits, confusion (true, predicted)
        for index, (p, label, _, _) in probs.items():
            if label < 0 or mix.entry_of(index) != d:
                continue
            stats[0] -= math.log(max(p[label].item(), 1e-12))
            stats[1] += float(label in p.topk(min(5, n)).indices)
            stats[2 + label * n + p.argmax().item()] += 1
        stats = torch.tensor(all_reduce_sums(stats.tolist(), device), dtype=torch.float64)
        confusion = stats[2:].view(n, n)
        count = confusion.sum().item()
        if count:
            results[name] = summarize(space, stats[0].item(), stats[1].item(), confusion)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, skipped)
    return results, probs, sorted(set().union(*gathered))


def summarize(space, loss_sum, top5_hits, confusion):
    count = confusion.sum().item()
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    seen = confusion.sum(1) > 0
    return {"label_space": space, "loss": loss_sum / count, "top1": confusion.diag().sum().item() / count,
            "top5": top5_hits / count, "mean_class_acc": per_class[seen].mean().item(), "count": int(count),
            "confusion": confusion}


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


def prediction_rows(probs, samples):
    """(index, predictions.jsonl row) for this rank's samples: top-5 with probabilities, or an error
    for an unreadable video (a stand-in's probabilities never speak for it)."""
    rows = []
    for i, (p, _, _, readable) in probs.items():
        row = {"video": samples[i].video, "record": samples[i].source, "label": samples[i].label}
        if readable:
            row["top5"] = [[int(c), round(float(p[c]), 6)] for c in p.topk(min(5, len(p))).indices]
        else:
            row["error"] = "unreadable video"
        rows.append((i, row))
    return rows


def write_eval_outputs(cfg, mix, results, rows, skipped):
    from PIL import Image

    summary = {"checkpoint": cfg.checkpoint, "views": {"clips": cfg.eval_num_clips, "crops": cfg.eval_num_crops,
                                                       "averaging": "softmax probabilities"},
               "sampling": {k: getattr(cfg, k) for k in ("video_fps", "video_maxlen", "video_num_frames",
                                                         "video_min_pixels", "video_max_pixels")},
               "skipped_videos": skipped, "datasets": {}}
    for name, r in results.items():
        names = class_names(mix.classes, r["label_space"], len(r["confusion"]))
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
