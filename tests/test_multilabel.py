"""Multi-label end to end, in one short in-process run that also mixes a single-label space and reads
frame folders: the demo's clips as before (default space, 6 classes), and the same clips as PNG
frame folders (fps from the entry's frame_fps) with multi-label tags (a second, multi-label space).
Its mAP is then recomputed by hand from VideoClassifier's per-class probabilities."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import train
from evaluation import average_precision
from inference import VideoClassifier
from video import decode_frames, probe_video

TAGS = ["horizontal", "vertical", "right_down_or_grow"]
# move_left, move_right, move_up, move_down, grow, shrink -> their tags (shrink: none)
TAGS_OF = [[0], [0, 2], [1], [1, 2], [2], []]


def tagged_frame_folders(synthetic_dir, out):
    """{split}.jsonl of the synthetic clips as PNG frame folders under out/, labels TAGS_OF, and
    classes.json; the training records have no fps (the dataset entry gives it), the 6 val records
    their own (predict reads them without a config). Also six/val.jsonl: the first 6 val clips as videos."""
    os.makedirs(os.path.join(out, "six"))
    for split, count in (("train", None), ("val", 6)):
        lines = []
        with open(os.path.join(synthetic_dir, f"{split}.jsonl")) as f:
            for line in f.readlines()[:count]:
                record = json.loads(line)
                path = os.path.join(synthetic_dir, record["videos"][0])
                folder = os.path.join(out, os.path.basename(path) + "_frames")
                os.makedirs(folder)
                for i, frame in enumerate(decode_frames(path, range(probe_video(path).num_frames))):
                    Image.fromarray(frame).save(os.path.join(folder, f"img_{i + 1:05d}.png"))
                lines.append({**record, "videos": [os.path.basename(folder)], "action_label": TAGS_OF[record["action_label"]],
                              **({"fps": 8} if split == "val" else {})})
                if split == "val":
                    with open(os.path.join(out, "six", "val.jsonl"), "a") as six:
                        six.write(json.dumps({**record, "videos": [path]}) + "\n")
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in lines))
    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump(TAGS, f)
    return out


def test_multi_label_space_beside_a_single_label_one(base_args, synthetic_dir, tmp_path):
    tags = tagged_frame_folders(synthetic_dir, str(tmp_path / "tags"))
    out = tmp_path / "run"
    train.main(base_args + [
        "--label_spaces", "{tags: {num_classes: 3, multi_label: true}}",
        "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}, {{path: {tags}/train.jsonl, label_space: tags, "
                            f"frame_fps: 8}}]",
        "--eval_datasets", f"[{{path: {tags}/six/val.jsonl, name: synthetic}}, {{path: {tags}/val.jsonl, "
                           f"label_space: tags, name: tags}}]",
        "--class_weights", "{tags: balanced}", "--label_smoothing_factor", "0.1", "--max_steps", "2"])
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    val = {m["dataset"]: m for m in metrics if m["split"] == "val"}
    assert set(val) == {"synthetic", "tags"} and "mean_class_acc" in val["synthetic"]
    tagged = val["tags"]
    assert tagged["count"] == 6 and len(tagged["per_class_ap"]) == 3 and tagged["classes_without_positives"] == 0
    assert 0 <= tagged["top1"] <= tagged["top5"] <= 1 and all(0 < ap <= 1 for ap in tagged["per_class_ap"])

    # the classifier gives each tag its own probability; the chosen set is those >= the threshold
    clf = VideoClassifier.from_pretrained(str(out / "checkpoints" / "step_0000002"), "cpu")
    assert clf.multi_label == {"tags"} and clf.manifest("fp32", "x")["multi_label"] == ["tags"]
    rows = clf.predict([f"{tags}/val.jsonl"], top_k=2, label_space="tags", threshold=0.5)
    probs = np.array([[row["probs"][name] for name in TAGS] for row in rows])
    assert probs.shape == (6, 3) and not np.allclose(probs.sum(1), 1)  # sigmoids, not a softmax
    assert all(set(row["chosen"]) == {n for n, p in row["probs"].items() if p >= 0.5} and len(row["top"]) == 2
               for row in rows)
    with open(f"{tags}/val.jsonl") as f:
        labels = [json.loads(line)["action_label"] for line in f]
    targets = np.array([[c in y for c in range(3)] for y in labels], float)
    by_hand = [average_precision(probs[:, c], targets[:, c]) for c in range(3)]
    print(f"tags val: mAP {tagged['mAP']:.4f}, per-class AP {tagged['per_class_ap']}; from predict: {by_hand}")
    assert tagged["per_class_ap"] == pytest.approx(by_hand, abs=1e-5)
    assert tagged["mAP"] == pytest.approx(sum(by_hand) / 3, abs=1e-5)
