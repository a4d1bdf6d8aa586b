"""The training loss of one label space: cross-entropy (single-label) or binary cross-entropy
(multi-label), with label smoothing and class weights. No project imports.

    weights = class_weights("balanced", labels, num_classes, multi_label)   # from the training labels
    loss = head_loss(logits, labels, LossSettings(smoothing, weights, multi_label))

Labels as data.Collator gives them: (B,) class indices for a single-label space, -100 where nothing
counts; (B, K) for a multi-label space, each row the positive classes padded with -1, a row of -100
where nothing counts (a (B,) row of -100s: no row counts).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class LossSettings:
    smoothing: float = 0.0  # label_smoothing_factor
    weights: torch.Tensor | None = None  # (C,): CE's weight= / BCE's pos_weight= or per-class weight (see below)
    multi_label: bool = False
    balanced: bool = False  # multi-label: `weights` are pos_weight (balanced), else each class's term's weight


def class_weights(setting, labels, num_classes, multi_label):
    """setting: None, "balanced" or a list of C weights -> (C,) float tensor or None.
    "balanced", single-label: sklearn's class_weight="balanced", N / (C x count_c) over the training
    labels (a class with no training sample gets 1: it has no loss term to weigh, only its share of
    the smoothing). Multi-label: negatives_c / positives_c, torch's advice for BCE's pos_weight (1 for
    a class with no positive, or no negative)."""
    if setting is None:
        return None
    if setting != "balanced":
        return torch.tensor(setting, dtype=torch.float32)
    if multi_label:
        positives = torch.zeros(num_classes)
        for classes in labels:
            positives[list(classes)] += 1
        negatives = len(labels) - positives
        ok = (positives > 0) & (negatives > 0)
        return torch.where(ok, negatives / positives.clamp(min=1), torch.ones(num_classes))
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).float()
    return torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), torch.ones(num_classes))


def multi_hot(labels, num_classes):
    """(B, K) positives padded with -1 (a row of -100: no label) -> ((B, C) 0/1 float targets, (B,) rows
    that count)."""
    if labels.dim() == 1:  # no row of this batch has a label
        return torch.zeros(len(labels), num_classes, device=labels.device), torch.zeros_like(labels, dtype=torch.bool)
    counts = labels[:, 0] != IGNORE
    targets = torch.zeros(len(labels), num_classes + 1, device=labels.device)
    targets.scatter_(1, torch.where(labels >= 0, labels, num_classes), 1.0)  # padding goes to a spare column
    return targets[:, :num_classes], counts


def head_loss(logits, labels, settings):
    """Mean loss over the rows that count (0 with a gradient when none does)."""
    logits = logits.float()
    if not settings.multi_label:
        if not (labels != IGNORE).any():
            return logits.sum() * 0
        return F.cross_entropy(logits, labels, weight=settings.weights, label_smoothing=settings.smoothing,
                               ignore_index=IGNORE)
    targets, counts = multi_hot(labels, logits.shape[1])
    if not counts.any():
        return logits.sum() * 0
    targets = targets * (1 - settings.smoothing) + settings.smoothing / 2  # smoothed towards 1/2
    weights = settings.weights  # on the logits' device (train.loss_settings puts them there once)
    terms = F.binary_cross_entropy_with_logits(logits[counts], targets[counts], reduction="none",
                                               pos_weight=weights if settings.balanced else None)
    if weights is not None and not settings.balanced:
        terms = terms * weights
    return terms.mean()


def multi_label_hits(logits, labels):
    """(rows that count, rows whose highest-scoring class is one of its positives): multi-label top-1."""
    targets, counts = multi_hot(labels, logits.shape[1])
    top = logits.argmax(1)
    return int(counts.sum()), int((targets[torch.arange(len(top)), top] * counts).sum())
