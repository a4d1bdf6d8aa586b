"""Evaluation, shared by train.py (periodic and --eval_only) and predict.py.

    view_probabilities(model, loader, ...)   softmax probabilities averaged over the views, per sample
    evaluate(model, loader, mix, cfg, ...)   per eval dataset: loss, top-1, top-5, mean class accuracy,
                                             confusion matrix; every sample exactly once across ranks
    write_eval_outputs(...)                  eval.json, predictions.jsonl, confusion_<dataset>.png

Views: eval_num_clips temporal views (clip c of C takes the frame at (c + 0.5) / C of each segment)
times eval_num_crops spatial views (1: the whole frame; 3: start/centre/end squares).
"""

import io
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch

from checkpoint import write_atomically, write_text
from config import head_sizes, multi_label_spaces
from batch_plan import PADDING, eval_plan
from loaders import make_loader
from distributed import all_gather, all_reduce_sums


def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()


def eval_views(cfg):
    """(clip, num_clips, crop, num_crops) for every view; one (0, 1, 0, 1) by default."""
    return [(c, cfg.eval_num_clips, k, cfg.eval_num_crops)
            for c in range(cfg.eval_num_clips) for k in range(cfg.eval_num_crops)]


def class_names(classes, space, num_classes):
    """The label space's names from classes.json, else the class indices as names."""
    return classes.get(space, [str(i) for i in range(num_classes)])


def eval_loader(mix, collate, cfg, world, rank):
    """Every view of every sample, this rank's share. Built once: its workers persist from one
    evaluation to the next. A training run under FSDP2 pads the ranks to the same batch count
    (--eval_only never shards the model, so it needs no padding)."""
    plan = eval_plan(mix.counts, cfg.per_device_eval_batch_size, world, rank, eval_views(cfg),
                     pad=cfg.fsdp and not cfg.eval_only)
    return make_loader(mix.dataset, plan, collate, cfg.dataloader_num_workers, cfg.seed)


@torch.no_grad()
def batch_probabilities(model, batch, num_views, context, device, multi_label=False):
    """One batch's probabilities divided by the view count (a view's share of the average), float64
    on the CPU: (B, num_classes); softmax, or in a multi-label space each class's sigmoid. `context`:
    autocast or nullcontext."""
    with context:
        logits = model(batch.label_space, **{k: v.to(device) for k, v in batch.inputs.items()}).float()
    probs = logits.sigmoid() if multi_label else logits.softmax(-1)
    return probs.cpu().double() / num_views


def row_label(labels, row):
    """A Batch's label of one row: the class index, or -1 when nothing counts; in a multi-label space
    (2-D labels) the list of positive classes, or -1."""
    if labels.dim() == 1:
        return max(labels[row].item(), -1)
    values = labels[row].tolist()
    return -1 if values[0] == -100 else [c for c in values if c >= 0]


def averaged_views(model, loader, num_views, context, device, skipped, multi_label=frozenset()):
    """Yields (index, probabilities, label or -1, record, readable) for each sample as soon as all
    `num_views` of its views have gone through the model: softmax probabilities (sigmoid in the
    spaces of `multi_label`) averaged over the views. Evaluation and inference both average this
    way. `readable` is False when another sample stood in for its video in any view; `skipped`
    collects those videos' messages."""
    totals, seen, unreadable = {}, {}, set()
    for batch in loader:
        probs = batch_probabilities(model, batch, num_views, context, device, batch.label_space in multi_label)
        skipped.extend(batch.skipped)
        for row, (index, valid) in enumerate(zip(batch.index.tolist(), batch.valid.tolist())):
            if index == PADDING:  # FSDP2's padding batch: run for the collectives only
                continue
            totals[index] = totals[index] + probs[row] if index in totals else probs[row]
            seen[index] = seen.get(index, 0) + 1
            if not valid:  # another video stood in for it: its probabilities are not this video's
                unreadable.add(index)
            if seen[index] == num_views:
                yield index, totals.pop(index), row_label(batch.labels, row), batch.sources[row], index not in unreadable


def view_probabilities(model, loader, num_views, context, device, multi_label=frozenset()):
    """Softmax probabilities averaged over the views, for every sample the loader yields (each
    sample once per view): {index: (probabilities, label or -1, record, readable)}. Also returns
    the messages of unreadable videos (another sample stood in for them; they count nowhere)."""
    was_training = model.training
    model.eval()
    skipped = []
    out = {index: rest for index, *rest in averaged_views(model, loader, num_views, context, device, skipped,
                                                          multi_label)}
    model.train(was_training)
    return out, sorted(set(skipped))


def evaluate(model, loader, mix, cfg, device):
    """Per eval dataset: loss (of the view-averaged probabilities), top-1, top-5, mean per-class
    accuracy, count, and the confusion matrix; reduced across ranks as sums. A collective: every
    rank calls it. Returns (results by dataset name, this rank's probabilities, skipped videos of
    every rank)."""
    multi = multi_label_spaces(cfg)
    probs, skipped = view_probabilities(model, loader, len(eval_views(cfg)), autocast(cfg, device), device, multi)
    sizes, results = head_sizes(cfg), {}
    for d, (name, space) in enumerate(zip(mix.names, mix.spaces)):  # the same order on every rank
        n = sizes[space]
        if space in multi:
            scored = [(p, label) for index, (p, label, _, _) in probs.items() if label != -1 and mix.entry_of(index) == d]
            gathered = [pair for part in all_gather(scored) for pair in part]
            if gathered:
                results[name] = multi_label_summary(space, gathered, n)
            continue
        stats = torch.zeros(2 + n * n, dtype=torch.float64)  # loss sum, top-5 hits, confusion (true, predicted)
        for index, (p, label, _, _) in probs.items():
            if mix.entry_of(index) != d or label < 0:  # in this order: another space's label may be a list
                continue
            stats[0] -= math.log(max(p[label].item(), 1e-12))
            stats[1] += float(label in p.topk(min(5, n)).indices)
            stats[2 + label * n + p.argmax().item()] += 1
        stats = torch.tensor(all_reduce_sums(stats.tolist(), device), dtype=torch.float64)
        confusion = stats[2:].view(n, n)
        count = confusion.sum().item()
        if count:
            results[name] = summarize(space, stats[0].item(), stats[1].item(), confusion)
    return results, probs, sorted(set().union(*all_gather(skipped)))


def average_precision(scores, positives):
    """AP of one class, as sklearn's average_precision_score: sum over the distinct score thresholds,
    highest first, of (recall gained) x (precision there); tied scores are one threshold. None when
    the class has no positive (AP is undefined)."""
    scores, positives = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(positives, dtype=torch.float64)
    if positives.sum() == 0:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positives = scores[order], positives[order]
    last = torch.cat([scores[1:] != scores[:-1], torch.tensor([True])])  # each tie group's last position
    hits = positives.cumsum(0)[last]
    precision = hits / (torch.arange(1, len(scores) + 1, dtype=torch.float64)[last])
    recall = hits / positives.sum()
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return (gained * precision).sum().item()


def multi_label_summary(space, scored, num_classes):
    """A multi-label dataset's metrics from [(sigmoid probabilities (C,), positive classes)]: mAP over
    the classes that have a positive (those without are left out and counted), per-class AP (None
    for those), top-1 / top-5 (a positive among the highest-scoring 1 / 5), and the loss (BCE of the
    view-averaged probabilities, per class and sample)."""
    probs = torch.stack([p for p, _ in scored])
    targets = torch.zeros_like(probs)
    for row, (_, positives) in enumerate(scored):
        targets[row, positives] = 1
    per_class = [average_precision(probs[:, c], targets[:, c]) for c in range(num_classes)]
    defined = [ap for ap in per_class if ap is not None]
    top5 = probs.topk(min(5, num_classes), dim=1).indices
    loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-12, 1 - 1e-12), targets).item()
    return {"label_space": space, "multi_label": True, "loss": loss,
            "mAP": sum(defined) / len(defined) if defined else float("nan"),
            "top1": targets.gather(1, probs.argmax(1, keepdim=True)).mean().item(),
            "top5": (targets.gather(1, top5).sum(1) > 0).double().mean().item(),
            "per_class_ap": per_class, "classes_without_positives": num_classes - len(defined), "count": len(scored)}


def summarize(space, loss_sum, top5_hits, confusion):
    count = confusion.sum().item()
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    seen = confusion.sum(1) > 0
    return {"label_space": space, "loss": loss_sum / count, "top1": confusion.diag().sum().item() / count,
            "top5": top5_hits / count, "mean_class_acc": per_class[seen].mean().item(), "count": int(count),
            "confusion": confusion}


# ---------------------------------------------------------------------------------------------------
# The evaluation report of `train.py --eval_only`: eval.json, predictions.jsonl, confusion PNGs

CONFUSION_NAMED_COLUMNS = 40  # up to this many classes the columns carry names too; beyond, their row positions


def confusion_figure(confusion, names):
    """The confusion matrix as a matplotlib Figure (the Agg canvas, no pyplot state): rows = true
    class, columns = predicted (same order), normalised per row, classes sorted by accuracy (worst
    first, so the problems sit together at the top). Class names label the rows, and the columns
    too up to CONFUSION_NAMED_COLUMNS classes (beyond that, column ticks give the row position every
    10: at 101 or 174 classes rotated names would not fit). Beside it, the per-class accuracy as bars
    with their values on the same rows, and a colour bar. The colour is the square root of the
    rate, so a rare confusion (0.02) still shows. Rows are 0.14 in (14 px at 100 dpi) at least,
    taller than the 6.5 pt labels, so 174 names stay legible; the figure grows with the classes."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    rates = (confusion / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    order = np.argsort(np.diag(rates), kind="stable")
    rates = rates[order][:, order]
    accuracy = np.diag(rates)
    n, named_columns = len(order), len(order) <= CONFUSION_NAMED_COLUMNS
    cell = min(0.6, max(0.14, 4.0 / n))  # inches per row and column
    fontsize = 8 if named_columns else 6.5
    side, gap, bar_width, bar_scale = n * cell, 0.2, 1.6, 0.18
    width = side + gap + bar_width + 4 * gap + bar_scale
    fig = Figure(figsize=(width, side), dpi=100)
    matrix = fig.add_axes((0, 0, side / width, 1), label="confusion")
    bars = fig.add_axes(((side + gap) / width, 0, bar_width / width, 1), sharey=matrix, label="accuracy")
    scale_height = min(side, 4.0)
    colour = fig.add_axes(((width - bar_scale) / width, 1 - scale_height / side, bar_scale / width, scale_height / side),
                          label="colour bar")
    image = matrix.imshow(rates, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    rows = [names[i][:45] if named_columns else f"{names[i][:45]}  {r:>3}" for r, i in enumerate(order)]
    matrix.set_yticks(range(n), rows, fontsize=fontsize)
    if named_columns:
        matrix.set_xticks(range(n), [names[i][:45] for i in order], rotation=90, fontsize=fontsize)
        matrix.set_xlabel("predicted class", fontsize=10)
    else:
        matrix.set_xticks(range(0, n, 10), [str(c) for c in range(0, n, 10)], fontsize=fontsize)
        matrix.set_xlabel("predicted class (its row's position, the number after each name)", fontsize=10)
    matrix.set_ylabel("true class (sorted by accuracy, worst first)", fontsize=10)
    if n <= 15:  # room for the rates themselves
        for (r, c), rate in np.ndenumerate(rates):
            if rate > 0:
                matrix.text(c, r, f"{rate:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if rate > 0.5 else "black")
    bars.barh(range(n), accuracy, height=0.7, color="tab:blue")
    for r, a in enumerate(accuracy):
        bars.text(min(a, 1.0) + 0.03, r, f"{a:.2f}", va="center", fontsize=fontsize)
    bars.set_xlim(0, 1.35)
    bars.set_xticks([0, 0.5, 1])
    bars.tick_params(labelleft=False, left=False)
    bars.set_xlabel("per-class accuracy", fontsize=10)
    for edge in ("top", "right"):
        bars.spines[edge].set_visible(False)
    fig.colorbar(image, cax=colour, ticks=[0, 0.02, 0.1, 0.25, 0.5, 1]).set_label(
        "fraction of the row's videos (sqrt scale)", fontsize=9)
    matrix.set_title(f"confusion matrix, {n} classes (rows: true, columns: predicted)", fontsize=11, loc="left")
    return fig


def confusion_image(confusion, names):
    """confusion_figure as an RGB uint8 array (HWC, for the PNG and TensorBoard)."""
    return figure_image(confusion_figure(confusion, names))


def figure_image(fig):
    """A figure as an RGB uint8 array, cropped to what it draws plus a white margin, so nothing is cut off."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return np.asarray(Image.open(buffer).convert("RGB"))


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


def multi_label_report(r, names):
    """eval.json's entry of a multi-label dataset: the metrics, and each class's AP by name (null:
    no positive in the set, left out of mAP)."""
    return {**{k: v for k, v in r.items() if k != "per_class_ap"},
            "per_class": {names[c]: {"ap": ap} for c, ap in enumerate(r["per_class_ap"])}}


def write_eval_outputs(cfg, mix, results, rows, skipped):
    from PIL import Image

    summary = {"checkpoint": cfg.checkpoint, "views": {"clips": cfg.eval_num_clips, "crops": cfg.eval_num_crops,
                                                       "averaging": "softmax probabilities"},
               "sampling": {k: getattr(cfg, k) for k in ("video_fps", "video_maxlen", "video_num_frames",
                                                         "video_min_pixels", "video_max_pixels")},
               "skipped_videos": skipped, "datasets": {}}
    for name, r in results.items():
        if r.get("multi_label"):
            summary["datasets"][name] = multi_label_report(r, class_names(mix.classes, r["label_space"],
                                                                          len(r["per_class_ap"])))
            print(f"{name}: mAP {r['mAP']:.4f} ({r['classes_without_positives']} classes without positives left "
                  f"out) top1 {r['top1']:.4f} top5 {r['top5']:.4f} loss {r['loss']:.4f} ({r['count']} samples)")
            continue
        names = class_names(mix.classes, r["label_space"], len(r["confusion"]))
        confusion = r["confusion"]
        per_class = {names[c]: {"accuracy": (confusion[c, c] / confusion[c].sum()).item(), "count": int(confusion[c].sum())}
                     for c in range(len(names)) if confusion[c].sum() > 0}
        summary["datasets"][name] = {**{k: v for k, v in r.items() if k != "confusion"}, "per_class": per_class,
                                     "confusion": confusion.long().tolist()}
        picture = Image.fromarray(confusion_image(confusion, names))
        write_atomically(os.path.join(cfg.output_dir, f"confusion_{name}.png"),
                         lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        print(f"{name}: top1 {r['top1']:.4f} top5 {r['top5']:.4f} mean class acc {r['mean_class_acc']:.4f} "
              f"loss {r['loss']:.4f} ({r['count']} samples)")
    write_text(os.path.join(cfg.output_dir, "eval.json"), json.dumps(summary, indent=1))
    write_text(os.path.join(cfg.output_dir, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote eval.json, predictions.jsonl and confusion_*.png to {cfg.output_dir}")
