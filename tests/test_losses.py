"""Loss options and multi-label metrics against reference computations written out by hand:
label_smoothing_factor (HF's definition), class weights (sklearn's "balanced"; torch's weighted mean),
BCE with smoothing and pos_weight, average precision (sklearn's definition) and mAP."""

import math

import numpy as np
import pytest
import torch

import config
from data import label_tensor
from evaluation import average_precision, multi_label_summary
from losses import LossSettings, class_weights, head_loss, multi_hot, multi_label_hits

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, -2.0, 0.5]])
LABELS = torch.tensor([0, 2, 1, 0])


def reference_ce(logits, labels, smoothing=0.0, weights=None):
    """HF's LabelSmoother / torch's definition, written out: with q = (1 - e) onehot + e / C and
    per-class weights w, loss_i = -sum_c w_c q_c log p_c, averaged with weights w_{y_i}."""
    n, c = logits.shape
    w = np.ones(c) if weights is None else np.asarray(weights, float)
    logp = logits.double().log_softmax(1).numpy()
    total, norm = 0.0, 0.0
    for i, y in enumerate(labels.tolist()):
        q = np.full(c, smoothing / c)
        q[y] += 1 - smoothing
        total += -(w * q * logp[i]).sum()
        norm += w[y]
    return total / norm


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_cross_entropy_with_smoothing_and_weights_matches_the_reference(smoothing, weights):
    w = torch.tensor(weights) if weights is not None else None
    ours = head_loss(LOGITS, LABELS, LossSettings(smoothing, w)).item()
    expected = reference_ce(LOGITS, LABELS, smoothing, weights)
    print(f"CE smoothing {smoothing} weights {weights}: {ours:.6f} (reference {expected:.6f})")
    assert ours == pytest.approx(expected, rel=1e-6)
    ignored = head_loss(torch.cat([LOGITS, LOGITS[:1]]), torch.cat([LABELS, torch.tensor([-100])]), LossSettings(smoothing, w))
    assert ignored.item() == pytest.approx(expected, rel=1e-6)  # a -100 row counts nowhere


def test_balanced_weights_are_sklearns():
    """N / (C x count_c): labels 0,0,0,1 over 3 classes -> 4/9, 4/3, and 1 for the absent class 2."""
    w = class_weights("balanced", [0, 0, 0, 1], 3, multi_label=False)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])
    assert class_weights([1, 2, 3], [0], 3, False).tolist() == [1, 2, 3] and class_weights(None, [0], 3, False) is None
    # multi-label: negatives / positives per class (1 where a class has no positive)
    w = class_weights("balanced", [[0], [0, 1], [], [0]], 3, multi_label=True)
    assert w.tolist() == pytest.approx([1 / 3, 3.0, 1.0])


def test_bce_with_smoothing_weights_and_ignored_rows():
    labels = label_tensor([[0, 2], [], None, [1]])
    assert labels.tolist() == [[0, 2], [-1, -1], [-100, -100], [1, -1]]
    targets, counts = multi_hot(labels, 3)
    assert targets.tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]] and counts.tolist() == [True, True, False, True]
    rows = [0, 1, 3]
    y = targets[rows].double().numpy()
    x = LOGITS[rows].double().numpy()
    sig = 1 / (1 + np.exp(-x))
    for smoothing, weights, balanced in [(0.0, None, False), (0.2, None, False), (0.1, [1.0, 3.0, 0.5], True),
                                         (0.0, [1.0, 3.0, 0.5], False)]:
        t = y * (1 - smoothing) + smoothing / 2
        w = np.ones(3) if weights is None else np.asarray(weights)
        pos = w if balanced else np.ones(3)
        per = -(pos * t * np.log(sig) + (1 - t) * np.log(1 - sig))  # torch's pos_weight form
        expected = (per * (w if not balanced else 1)).mean()
        settings = LossSettings(smoothing, torch.tensor(weights) if weights else None, True, balanced)
        ours = head_loss(LOGITS, labels, settings).item()
        print(f"BCE smoothing {smoothing} weights {weights} balanced {balanced}: {ours:.6f} (reference {expected:.6f})")
        assert ours == pytest.approx(expected, rel=1e-6)
    assert multi_label_hits(LOGITS, labels) == (3, 1)  # best classes 0, 2, 0: only row 0's is a positive


def test_average_precision_by_hand():
    """scores .9 .8 .7 .6 .5, positives at ranks 1, 3, 4 (of 3): precision at each positive 1, 2/3,
    3/4, recall steps 1/3 each: AP = (1 + 2/3 + 3/4) / 3 = 0.805555..."""
    assert average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 1, 0]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # a tie is one threshold (sklearn): scores .9 .5 .5, positives at .9 and one .5 -> (1 + 2/3) / 2
    assert average_precision([0.9, 0.5, 0.5], [1, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.9, 0.5, 0.5], [1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.3, 0.2], [0, 0]) is None  # no positive: undefined


def test_map_leaves_out_and_counts_classes_without_positives():
    """Class 0 ranked perfectly (AP 1), class 1 worst (positive last of 3: AP 1/3), class 2 no
    positive: mAP (1 + 1/3) / 2, one class left out."""
    scored = [(torch.tensor([0.9, 0.1, 0.2]), [0]), (torch.tensor([0.2, 0.8, 0.3]), []),
              (torch.tensor([0.1, 0.05, 0.4]), [1])]
    r = multi_label_summary("default", scored, 3)
    assert r["per_class_ap"][0] == pytest.approx(1.0) and r["per_class_ap"][1] == pytest.approx(1 / 3)
    assert r["per_class_ap"][2] is None and r["classes_without_positives"] == 1
    assert r["mAP"] == pytest.approx((1 + 1 / 3) / 2)
    # top-1: rows whose best class is a positive (row 0 yes; row 1 has none; row 2's best, class 2, no)
    assert r["top1"] == pytest.approx(1 / 3) and r["count"] == 3
    expected_loss = -np.mean([math.log(p if y else 1 - p) for (s, pos) in scored for c, p in enumerate(s.tolist())
                              for y in [c in pos]])
    assert r["loss"] == pytest.approx(expected_loss)


def test_loss_and_space_keys_are_checked():
    good = {"train_datasets": [{"path": "x.jsonl"}], "num_action_classes": 3, "class_weights": {"default": [1, 2, 3],
            "tags": "balanced"}, "label_spaces": {"tags": {"num_classes": 5, "multi_label": True}, "axis": 2},
            "label_smoothing_factor": 0.1, "multi_label": True}
    cfg = config.validated_config(dict(good), "test")
    assert config.head_sizes(cfg) == {"default": 3, "tags": 5, "axis": 2}
    assert config.multi_label_spaces(cfg) == {"default", "tags"}
    bad = {**good, "class_weights": {"default": [1, 2], "nope": "balanced", "axis": "even"},
           "label_smoothing_factor": 1.0, "label_spaces": {**good["label_spaces"], "x": {"classes": 3}}}
    with pytest.raises(config.ConfigError) as e:
        config.validated_config(bad, "test")
    message = str(e.value)
    assert "label_smoothing_factor: must be in [0, 1), got 1.0" in message
    assert "label_spaces.x: expected {num_classes: N, multi_label: true|false}" in message
    bad["label_spaces"] = good["label_spaces"]
    with pytest.raises(config.ConfigError) as e:
        config.validated_config(bad, "test")
    message = str(e.value)
    assert "class_weights.default: 2 weights for the 3 classes" in message
    assert "class_weights.nope: no label space 'nope'" in message and 'class_weights.axis: expected "balanced"' in message


def test_multi_label_records_are_checked_together(tmp_path):
    """A list label in a single-label space, a class outside the space, a repeated class: one message,
    file:line each; in a multi-label space an int is one positive."""
    import json

    from data import EntryRules, load_samples
    from video import DataError

    (tmp_path / "v.mp4").write_bytes(b"x")
    messages = [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "<ACT>"}]
    path = tmp_path / "r.jsonl"
    labels = [[0, 2], 3, [1, 1], [4], []]
    path.write_text("".join(json.dumps({"messages": messages, "videos": ["v.mp4"], "action_label": y}) + "\n"
                            for y in labels))
    with pytest.raises(DataError) as e:
        load_samples(str(path), None, 3)
    message = str(e.value)
    assert message.startswith("5 problem(s) in")
    assert f"{path}:1: `action_label` is a list [0, 2], but this label space is single-label: declare it multi-label" in message
    assert f"{path}:2: `action_label` 3 is outside [0, 3)" in message
    with pytest.raises(DataError) as e:
        load_samples(str(path), None, 3, rules=EntryRules(multi_label=True))
    message = str(e.value)
    assert message.startswith("3 problem(s) in") and f"{path}:3: `action_label` [1, 1] lists a class twice" in message
    assert f"{path}:4: `action_label` 4 is outside [0, 3)" in message
    path.write_text("".join(json.dumps({"messages": messages, "videos": ["v.mp4"], "action_label": y}) + "\n"
                            for y in [[0, 2], 1, []]))
    samples, _ = load_samples(str(path), None, 3, rules=EntryRules(multi_label=True))
    assert [s.label for s in samples] == [[0, 2], [1], []]


def test_map_on_a_generated_multi_label_set_with_a_known_answer():
    """200 clips x 6 classes, positives drawn at random (class 5: none). Classes 0-2 scored perfectly
    (AP 1), classes 3-4 exactly inverted (every negative above every positive: AP = mean over the
    k-th positive of k / (negatives + k)); class 5 left out and counted: mAP = their mean over 5."""
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 6)) < [0.1, 0.3, 0.5, 0.2, 0.4, 0.0]).astype(float)
    noise = rng.random((200, 6)) * 0.5
    scores = np.where(targets > 0, 0.5 + noise, noise)  # positives all above negatives
    scores[:, 3:5] = 1 - scores[:, 3:5]  # ... and below them for classes 3, 4
    scored = [(torch.tensor(s), [c for c in range(6) if t[c]]) for s, t in zip(scores, targets)]
    r = multi_label_summary("default", scored, 6)
    inverted = [np.mean([k / (200 - p + k) for k in range(1, p + 1)]) for p in targets[:, 3:5].sum(0).astype(int)]
    expected = (3 + sum(inverted)) / 5
    print(f"generated set: mAP {r['mAP']:.6f}, known answer {expected:.6f}; per-class AP {r['per_class_ap']}")
    assert r["per_class_ap"][:3] == pytest.approx([1, 1, 1]) and r["per_class_ap"][3:5] == pytest.approx(inverted)
    assert r["per_class_ap"][5] is None and r["classes_without_positives"] == 1
    assert r["mAP"] == pytest.approx(expected)
