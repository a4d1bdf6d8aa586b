"""prepare/synthetic.py: the files it writes decode, motion carries the label, one frame does not."""

import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `prepare`
from prepare.synthetic import CLASSES, main, make_clip, write_video  # noqa: E402

THRESHOLD = 180  # objects are >= 215 in every channel, backgrounds <= 140


def decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def object_stats(frame):
    """(centroid x, centroid y, area) of the bright object, in pixels."""
    ys, xs = np.nonzero(frame.min(-1) > THRESHOLD)
    assert len(xs) > 0, "no object found"
    return xs.mean(), ys.mean(), len(xs)


def generate(out, *extra):
    main(["--out", str(out), "--train", "12", "--val", "6", "--size", "64", "--frames", "6", *extra])


def test_dataset_files_decode_and_reproduce(tmp_path):
    generate(tmp_path / "a", "--workers", "2")
    generate(tmp_path / "b", "--workers", "1")  # same seed, no pool: must not matter
    a, b = tmp_path / "a", tmp_path / "b"
    assert json.loads((a / "classes.json").read_text()) == CLASSES
    for split, n in [("train", 12), ("val", 6)]:
        text = (a / f"{split}.jsonl").read_text()
        assert text == (b / f"{split}.jsonl").read_text()  # byte-identical
        records = [json.loads(line) for line in text.splitlines()]
        assert len(records) == n
        exts = set()
        for i, r in enumerate(records):
            assert r["messages"][0] == {"role": "user", "content": "<video>What action is being performed in this video?"}
            assert r["messages"][1] == {"role": "assistant", "content": "The action being performed is <ACT>."}
            (video,) = r["videos"]
            assert video.startswith(f"videos/{split}_{i:05d}.")
            exts.add(video.rsplit(".", 1)[1])
            frames = decode(a / video)
            assert frames.shape == (6, 64, 64, 3), video
            assert (a / video).read_bytes() == (b / video).read_bytes(), video  # same bytes
        assert exts == {"mp4", "avi", "webm"}
        labels = [r["action_label"] for r in records]
        assert sorted(set(labels)) == list(range(len(CLASSES)))  # balanced: every class present
        assert labels != sorted(labels)  # shuffled
    assert not list(a.glob("**/.tmp_*"))  # no temp files left behind
    # a different seed gives a different dataset
    generate(tmp_path / "c", "--seed", "1", "--workers", "1")
    assert (tmp_path / "c" / "train.jsonl").read_text() != (a / "train.jsonl").read_text()


@pytest.mark.parametrize("ext", ["mp4", "avi", "webm"])
@pytest.mark.parametrize("n", [1, 5])
def test_write_video_keeps_every_frame(tmp_path, ext, n):
    frames = make_clip(0, np.random.default_rng(n), size=48, frames=max(n, 2))[:n]
    write_video(tmp_path / f"v.{ext}", frames, fps=8)
    got = decode(tmp_path / f"v.{ext}")
    assert got.shape == frames.shape
    # lossy, but the white object stays put: same object pixels within a small margin
    for want, have in zip(frames, got):
        assert abs(object_stats(have)[0] - object_stats(want)[0]) < 1.0


def test_write_video_rejects_odd_sizes_and_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "v.mp4", np.zeros((2, 33, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="extension"):
        write_video(tmp_path / "v.mkv", np.zeros((2, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("seed", range(5))
def test_motion_carries_the_label(seed):
    S = 96
    for label, name in enumerate(CLASSES):
        clip = make_clip(label, np.random.default_rng([seed, label]), size=S, frames=8)
        (x0, y0, a0), (x1, y1, a1) = object_stats(clip[0]), object_stats(clip[-1])
        dx, dy = (x1 - x0) / S, (y1 - y0) / S  # in fractions of the frame
        if name == "move_left":
            assert dx < -0.25 and abs(dy) < 0.02, (dx, dy)
        elif name == "move_right":
            assert dx > 0.25 and abs(dy) < 0.02, (dx, dy)
        elif name == "move_up":  # image y points down
            assert dy < -0.25 and abs(dx) < 0.02, (dx, dy)
        elif name == "move_down":
            assert dy > 0.25 and abs(dx) < 0.02, (dx, dy)
        elif name == "grow":
            assert a1 / a0 > 3.0 and abs(dx) < 0.03 and abs(dy) < 0.03, (a1 / a0, dx, dy)
        elif name == "shrink":
            assert a1 / a0 < 1 / 3.0 and abs(dx) < 0.03 and abs(dy) < 0.03, (a1 / a0, dx, dy)
        # the object moves smoothly: frame-to-frame steps all go the same way
        steps = np.diff([object_stats(f)[label // 2 % 2 if label < 4 else 2] for f in clip])
        sign = {0: -1, 1: 1, 2: -1, 3: 1, 4: 1, 5: -1}[label]
        assert np.all(sign * steps > 0), steps


def best_threshold_accuracy(a, b):
    """Accuracy of the best one-feature threshold classifier separating samples a from b."""
    values = np.concatenate([a, b])
    is_a = np.concatenate([np.ones(len(a), bool), np.zeros(len(b), bool)])
    best = 0.5
    for t in values:
        acc = np.mean((values <= t) == is_a)
        best = max(best, acc, 1 - acc)
    return best


def test_first_frame_does_not_give_away_the_class():
    S, n = 64, 150  # 150 first frames per class: standard error of a mean position ~0.005 S
    stats = {}
    for label in range(len(CLASSES)):
        firsts = [make_clip(label, np.random.default_rng([7, label, i]), size=S, frames=2)[0] for i in range(n)]
        x, y, area = np.array([object_stats(f) for f in firsts]).T
        stats[label] = {"x": x / S, "y": y / S, "size": np.sqrt(area) / S}
    pairs = [(0, 1), (2, 3), (4, 5), (0, 2), (0, 4)]  # left/right, up/down, grow/shrink, and across groups
    for a, b in pairs:
        for key in ("x", "y", "size"):
            u, v = stats[a][key], stats[b][key]
            # means within 0.03 of the frame (position) or of the frame's side (size). For scale: the
            # objects move by >= 0.35 and change size by >= 2x, so a "start at the far side" or "start
            # small" leak would differ by ~0.2-0.5 here.
            assert abs(u.mean() - v.mean()) < 0.03, (CLASSES[a], CLASSES[b], key, u.mean(), v.mean())
            assert abs(u.std() - v.std()) < 0.02, (CLASSES[a], CLASSES[b], key, u.std(), v.std())
            # and the best single threshold on the feature is near chance (a leak would give ~0.9+)
            acc = best_threshold_accuracy(u, v)
            assert acc < 0.64, (CLASSES[a], CLASSES[b], key, acc)
