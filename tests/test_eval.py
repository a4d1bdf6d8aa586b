"""Evaluation (issue 5): --eval_only outputs, multi-view testing, distributed eval, the best checkpoint,
predict.py. Driven through train.main / predict.main / torchrun; references are computed independently
(per-clip forwards of the checkpoint's model, or the training run's own periodic eval)."""

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import evaluation
import predict
import train
import video
from inference import VideoClassifier
from prepare.synthetic import CLASSES, make_clip, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.yaml")
TOL = 3e-6  # predictions.jsonl / predict --json round probabilities to 6 decimals


def confusion_image(confusion, names):
    """The renderer behind confusion_<dataset>.png, wherever the refactor puts it."""
    render = evaluation.confusion_image
    return render(confusion, names)


# ---------------------------------------------------------------------------------------------------
# Fixtures, shared by the module: one short training run, one eval_only of its best checkpoint, and a
# reference model (the checkpoint loaded on its own) to compute per-view probabilities clip by clip.

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def common_args(tiny_model_dir, eval_path, video_root, out):
    return ["--config", CONFIG, "--model_name_or_path", tiny_model_dir,
            "--eval_datasets", f"[{{path: {eval_path}, video_root: {video_root}}}]",
            "--video_min_pixels", "3136", "--video_max_pixels", "3136",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6",
            "--dataloader_num_workers", "0", "--output_dir", str(out)]


@pytest.fixture(scope="module")
def evalset(synthetic_dir, tmp_path_factory):
    """11 records (odd: padding duplicates would show on 2 ranks), classes 0..3 with 5/3/2/1 samples
    (distinct counts, so top-1 moves when the predicted class moves; classes 4, 5 absent) + classes.json."""
    folder = tmp_path_factory.mktemp("evalset_parent") / "evalset"
    folder.mkdir()
    records = read_jsonl(os.path.join(synthetic_dir, "val.jsonl")) + read_jsonl(os.path.join(synthetic_dir, "train.jsonl"))
    want, chosen = {0: 5, 1: 3, 2: 2, 3: 1}, []
    for r in records:
        if want.get(r["action_label"], 0) > 0:
            chosen.append(r)
            want[r["action_label"]] -= 1
    random.Random(0).shuffle(chosen)
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    shutil.copy(os.path.join(synthetic_dir, "classes.json"), folder / "classes.json")
    return str(folder / "val.jsonl")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, synthetic_dir, evalset, tmp_path_factory):
    """5 steps, eval after every step, keep 1 step checkpoint (+ best). A large learning rate makes
    val top-1 go 0 -> 0.45 -> 0 -> 0.45 -> 0.45 here: the best is step 2 (first of the ties)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train.main(common_args(tiny_model_dir, evalset, synthetic_dir, out) + [
        "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]", "--max_steps", "5",
        "--learning_rate", "3e-2", "--warmup_steps", "0", "--logging_steps", "1", "--eval_steps", "1",
        "--save_steps", "0", "--save_total_limit", "1"])
    return str(out)


def val_lines(run):
    return [m for m in read_jsonl(os.path.join(run, "metrics.jsonl")) if m["split"] == "val"]


def eval_only_args(tiny_model_dir, evalset, synthetic_dir, out, checkpoint, *extra):
    # train_datasets points nowhere: eval_only must not read it
    return common_args(tiny_model_dir, evalset, synthetic_dir, out) + [
        "--eval_only", "--checkpoint", checkpoint, "--train_datasets", "[{path: /nonexistent/train.jsonl}]", *extra]


def run_eval_only(args):
    """train.main(args) with every torch optimizer refusing to be built."""
    def refuse(*a, **k):
        raise AssertionError("eval_only built an optimizer")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Optimizer, "__init__", refuse)
        train.main(args)


@pytest.fixture(scope="module")
def best_eval(tiny_model_dir, synthetic_dir, evalset, trained, tmp_path_factory):
    """--eval_only on checkpoints/best, 1 clip x 1 crop."""
    out = tmp_path_factory.mktemp("best_eval") / "eval"
    run_eval_only(eval_only_args(tiny_model_dir, evalset, synthetic_dir, out,
                                 os.path.join(trained, "checkpoints", "best")))
    return str(out)


@pytest.fixture(scope="module")
def reference(trained):
    """The best checkpoint's model, loaded on its own; probs(samples, view) runs it clip by clip."""
    clf = VideoClassifier.from_pretrained(os.path.join(trained, "checkpoints", "best"), "cpu")
    cfg = config.saved_config(os.path.join(trained, "checkpoints", "best", "config.yaml"))
    settings = video.VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                                  cfg.video_max_pixels)
    model, collate = clf.model, data.Collator(clf.processor, clf.model.act_token_id)

    @torch.no_grad()
    def probs(samples, view):
        dataset = data.VideoDataset(samples, settings)
        rows = []
        for i in range(len(samples)):
            batch = collate([dataset[(i, 0, False, view)]])
            assert batch.valid.all()
            rows.append(model("default", **batch.inputs).float().softmax(-1)[0].double())
        return {s.video: p for s, p in zip(samples, rows)}
    return probs


def eval_samples(evalset, synthetic_dir):
    return data.load_samples(evalset, synthetic_dir, len(CLASSES))[0]


def assert_rows_match(rows, reference, tol=TOL):
    """Each predictions.jsonl row's top-5 = the reference probabilities of that video's top 5 classes."""
    assert {r["video"] for r in rows} == set(reference)
    for row in rows:
        ref = reference[row["video"]]
        classes = [c for c, _ in row["top5"]]
        for c, p in row["top5"]:
            assert abs(ref[c].item() - p) <= tol, (row["video"], c, ref[c].item(), p)
        left_out = [ref[c].item() for c in range(len(ref)) if c not in classes]
        assert max(left_out, default=0) <= min(p for _, p in row["top5"]) + tol, row  # really the top 5


# ---------------------------------------------------------------------------------------------------
# 1. --eval_only: eval.json, predictions.jsonl, confusion PNG, all consistent with each other

def test_eval_only_writes_consistent_eval_json_predictions_and_png(best_eval, evalset, synthetic_dir, trained):
    summary = json.load(open(os.path.join(best_eval, "eval.json")))
    assert summary["checkpoint"] == os.path.join(trained, "checkpoints", "best")
    assert summary["views"]["clips"] == 1 and summary["views"]["crops"] == 1
    assert summary["sampling"] == {"video_fps": 4, "video_maxlen": 8, "video_num_frames": None,
                                   "video_min_pixels": 3136, "video_max_pixels": 3136}
    assert list(summary["datasets"]) == ["evalset"]
    result = summary["datasets"]["evalset"]
    assert result["count"] == 11

    rows = read_jsonl(os.path.join(best_eval, "predictions.jsonl"))
    samples = eval_samples(evalset, synthetic_dir)
    # every eval sample exactly once, with its label
    assert sorted(r["video"] for r in rows) == sorted(s.video for s in samples)
    assert {r["video"]: r["label"] for r in rows} == {s.video: s.label for s in samples}
    assert {r["video"]: r["record"] for r in rows} == {s.video: s.source for s in samples}
    for r in rows:
        probs = [p for _, p in r["top5"]]
        assert len(r["top5"]) == 5 and len({c for c, _ in r["top5"]}) == 5
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5 and min(probs) >= 0

    # eval.json's numbers follow from predictions.jsonl
    hits = [r["top5"][0][0] == r["label"] for r in rows]
    assert result["top1"] == pytest.approx(sum(hits) / len(rows), abs=1e-9)
    assert result["top5"] == pytest.approx(sum(r["label"] in [c for c, _ in r["top5"]] for r in rows) / len(rows), abs=1e-9)
    per_class = result["per_class"]
    expected = {}
    for r, hit in zip(rows, hits):
        expected.setdefault(CLASSES[r["label"]], []).append(hit)
    assert set(per_class) == set(expected) == {"move_left", "move_right", "move_up", "move_down"}  # names, seen only
    for name, h in expected.items():
        assert per_class[name]["count"] == len(h)
        assert per_class[name]["accuracy"] == pytest.approx(sum(h) / len(h), abs=1e-9)
    assert result["mean_class_acc"] == pytest.approx(np.mean([v["accuracy"] for v in per_class.values()]), abs=1e-9)
    confusion = np.array(result["confusion"])
    assert confusion.shape == (6, 6) and confusion.sum() == 11 and np.trace(confusion) == sum(hits)
    assert math.isfinite(result["loss"]) and result["loss"] > 0

    # the PNG decodes and is the confusion matrix of this evaluation
    png = os.path.join(best_eval, "confusion_evalset.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(image, confusion_image(torch.tensor(confusion, dtype=torch.float64), CLASSES))

    # eval_only is not a training run: no checkpoints or training metrics in its output_dir
    assert not os.path.exists(os.path.join(best_eval, "checkpoints"))
    assert not os.path.exists(os.path.join(best_eval, "metrics.jsonl"))


def test_confusion_png_is_readable_at_6_101_and_174_classes():
    """One labelled row per class, and labels that do not print over each other (UCF101: 101 classes,
    SSv2: 174), so the figure grows with the class count; rows sorted worst first; axes labelled,
    a colour bar, the per-class accuracy beside each row; names on the columns too where they fit.
    Nothing (title, labels, scale) may run off the image: its outer 2 pixels stay white."""
    ucf101 = [row.split()[1] for row in open(os.path.join(ROOT, "tests", "data", "ucf101_classInd.txt")) if row.strip()]
    ssv2 = [f"Putting [something] next to [something] {i}" for i in range(174)]
    heights, problems = {}, []
    for n, names in [(6, CLASSES), (101, ucf101), (174, ssv2)]:
        confusion = torch.rand(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        accuracy = (confusion.diag() / confusion.sum(1)).numpy()
        worst_first = np.argsort(accuracy, kind="stable")
        fig = evaluation.confusion_figure(confusion, names)
        image = evaluation.figure_image(fig)  # what confusion_image gives: it draws the figure, once
        axes = {ax.get_label(): ax for ax in fig.axes}
        assert set(axes) == {"confusion", "accuracy", "colour bar"}, set(axes)
        matrix = axes["confusion"]
        assert "true" in matrix.get_ylabel() and "predicted" in matrix.get_xlabel()
        assert axes["colour bar"].get_ylabel(), "the colour bar says what the colour means"
        rows = [t for t in matrix.get_yticklabels() if t.get_text()]
        assert [t.get_text().split("  ")[0] for t in rows] == [names[i][:45] for i in worst_first]
        values = [float(t.get_text()) for t in axes["accuracy"].texts]
        assert values == pytest.approx(accuracy[worst_first], abs=0.005)
        boxes = sorted((t.get_window_extent() for t in rows), key=lambda b: b.y0)
        overlaps = sum(a.y1 > b.y0 + 0.5 for a, b in zip(boxes, boxes[1:]))
        if overlaps:
            problems.append(f"{n} classes: {overlaps} row labels overlap the next one")
        columns = [t for t in matrix.get_xticklabels() if t.get_text()]
        if n <= evaluation.CONFUSION_NAMED_COLUMNS:
            assert [t.get_text() for t in columns] == [names[i][:45] for i in worst_first]
            boxes = sorted((t.get_window_extent() for t in columns), key=lambda b: b.x0)
            if any(a.x1 > b.x0 + 0.5 for a, b in zip(boxes, boxes[1:])):
                problems.append(f"{n} classes: column labels overlap")
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        heights[n] = image.shape[0]
        border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                                 image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
        if border.min() < 250:
            problems.append(f"{n} classes: something is cut off at the image border")
    if not heights[6] < heights[101] < heights[174]:
        problems.append(f"image heights do not grow with the class count: {heights}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------
# 2. Multi-view testing

def test_one_by_one_view_equals_the_periodic_eval_of_the_same_checkpoint(best_eval, trained):
    best_step = json.load(open(os.path.join(trained, "checkpoints", "best", "trainer_state.json")))["step"]
    (logged,) = [m for m in val_lines(trained) if m["step"] == best_step]
    result = json.load(open(os.path.join(best_eval, "eval.json")))["datasets"]["evalset"]
    for key in ("top1", "top5", "mean_class_acc", "loss"):
        assert result[key] == pytest.approx(logged[key], abs=1e-6), key
    assert result["count"] == logged["count"] == 11


def test_two_clips_average_the_two_single_clip_probabilities(tiny_model_dir, synthetic_dir, evalset, trained,
                                                             best_eval, reference, tmp_path):
    samples = eval_samples(evalset, synthetic_dir)
    single = reference(samples, (0, 1, 0, 1))
    assert_rows_match(read_jsonl(os.path.join(best_eval, "predictions.jsonl")), single)  # the reference is eval's

    clip0, clip1 = reference(samples, (0, 2, 0, 1)), reference(samples, (1, 2, 0, 1))
    gap = max((clip0[v] - clip1[v]).abs().max().item() for v in clip0)
    assert gap > 30 * TOL, f"the two clips must see different frames (max probability gap {gap})"
    out = tmp_path / "two_clips"
    run_eval_only(eval_only_args(tiny_model_dir, evalset, synthetic_dir, out,
                                 os.path.join(trained, "checkpoints", "best"), "--eval_num_clips", "2"))
    summary = json.load(open(out / "eval.json"))
    assert summary["views"]["clips"] == 2 and summary["views"]["crops"] == 1
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 11
    average = {v: (clip0[v] + clip1[v]) / 2 for v in clip0}
    assert_rows_match(rows, average)
    # and the loss is that of the averaged probabilities
    labels = {s.video: s.label for s in samples}
    loss = np.mean([-math.log(average[v][labels[v]].item()) for v in average])
    assert summary["datasets"]["evalset"]["loss"] == pytest.approx(loss, abs=1e-5)


@pytest.fixture(scope="module")
def wide_set(tmp_path_factory):
    """Non-square clips (64 x 128, scaled to 28 x 56 by the pixel budget) and, between them, a file
    of random bytes named .mp4 (passes the up-front checks, fails to decode)."""
    folder = tmp_path_factory.mktemp("wide_parent") / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (a, b) in enumerate([(0, 4), (3, 5)]):
        frames = np.concatenate([make_clip(a, rng, 64, 8), make_clip(b, rng, 64, 8)], axis=2)  # side by side
        write_video(folder / f"wide_{i}.mp4", frames, fps=8)
    (folder / "broken.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    names = ["wide_0.mp4", "broken.mp4", "wide_1.mp4"]
    (folder / "val.jsonl").write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": "<video>What action is being performed in this video?"},
                     {"role": "assistant", "content": "The action being performed is <ACT>."}],
        "videos": [name], "action_label": label}) + "\n" for name, label in zip(names, [0, 1, 2])))
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return str(folder / "val.jsonl")


@pytest.fixture(scope="module")
def wide_eval(tiny_model_dir, wide_set, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide_eval") / "eval"
    run_eval_only(eval_only_args(tiny_model_dir, wide_set, os.path.dirname(wide_set), out,
                                 os.path.join(trained, "checkpoints", "best"), "--eval_num_crops", "3"))
    return str(out)


def test_three_crops_average_three_different_crops(wide_set, wide_eval, reference):
    samples = [s for s in data.load_samples(wide_set, None, len(CLASSES))[0] if os.path.basename(s.video).startswith("wide_")]
    whole = reference(samples, (0, 1, 0, 1))
    crops = [reference(samples, (0, 1, k, 3)) for k in range(3)]
    average = {v: sum(c[v] for c in crops) / 3 for v in whole}
    summary = json.load(open(os.path.join(wide_eval, "eval.json")))
    assert summary["views"]["crops"] == 3 and summary["datasets"]["wide"]["count"] == 2
    rows = [r for r in read_jsonl(os.path.join(wide_eval, "predictions.jsonl")) if os.path.basename(r["video"]).startswith("wide_")]
    assert_rows_match(rows, average)
    assert max((average[v] - whole[v]).abs().max().item() for v in whole) > 30 * TOL  # not the whole frame


def test_three_crops_are_the_start_centre_and_end_of_the_longer_side(wide_set):
    """On a 28 x 56 clip the three 28 x 28 crops must start at 0, 14 and 28: the centre crop centred,
    all three different. (Rounding the start down to 28 px makes the centre crop the first one again
    here; on SSv2's 427x240 clips at the shipped 16384-pixel budget, 84 x 168, it starts at 28, not 42.)"""
    samples = [s for s in data.load_samples(wide_set, None, len(CLASSES))[0] if os.path.basename(s.video) == "wide_0.mp4"]
    dataset = data.VideoDataset(samples, video.VideoSettings(4, 8, None, 3136, 3136))
    whole = dataset[(0, 0, False, (0, 1, 0, 1))].frames
    assert whole.shape[1:] == (28, 56, 3)
    crops = [dataset[(0, 0, False, (0, 1, k, 3))].frames for k in range(3)]
    for k, start in enumerate([0, 14, 28]):
        assert crops[k].shape == (len(whole), 28, 28, 3)
        assert np.array_equal(crops[k], whole[:, :, start:start + 28]), f"crop {k} should start at column {start}"
    assert not np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[1], crops[2])


def test_an_unreadable_eval_video_gets_no_prediction_and_is_reported(wide_set, wide_eval):
    summary = json.load(open(os.path.join(wide_eval, "eval.json")))
    assert summary["datasets"]["wide"]["count"] == 2  # the broken clip counts nowhere
    assert any("broken.mp4" in message for message in summary["skipped_videos"])
    rows = read_jsonl(os.path.join(wide_eval, "predictions.jsonl"))
    assert sum(os.path.basename(r["video"]).startswith("wide_") for r in rows) == 2
    broken = [r for r in rows if r["video"].endswith("broken.mp4")]
    # every row names its own record (file:line), not the one of the sample that stood in for it
    sources = {s.video: s.source for s in data.load_samples(wide_set, None, len(CLASSES))[0]}
    assert {r["video"]: r["record"] for r in rows} == {v: sources[v] for v in (r["video"] for r in rows)}, \
        "a predictions.jsonl row names another record than its own"
    # either left out or marked as an error, never another video's probabilities under its name
    assert all(not r.get("top5") for r in broken), f"predictions.jsonl scores the unreadable video: {broken}"


# ---------------------------------------------------------------------------------------------------
# 3. Distributed eval: every sample once, the same numbers on 1 and 2 ranks

def test_two_rank_eval_equals_one_rank(tiny_model_dir, synthetic_dir, evalset, trained, best_eval, tmp_path):
    out = tmp_path / "ddp_eval"
    args = eval_only_args(tiny_model_dir, evalset, synthetic_dir, out, os.path.join(trained, "checkpoints", "best"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(random.randint(20000, 40000)), os.path.join(ROOT, "train.py")] + args
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    one = json.load(open(os.path.join(best_eval, "eval.json")))["datasets"]["evalset"]
    two = json.load(open(out / "eval.json"))["datasets"]["evalset"]
    assert two["count"] == one["count"] == 11
    assert two["confusion"] == one["confusion"] and two["per_class"].keys() == one["per_class"].keys()
    for key in ("top1", "top5", "mean_class_acc", "loss"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key

    rows_one = sorted(read_jsonl(os.path.join(best_eval, "predictions.jsonl")), key=lambda r: r["video"])
    rows_two = sorted(read_jsonl(out / "predictions.jsonl"), key=lambda r: r["video"])
    assert [r["video"] for r in rows_two] == [r["video"] for r in rows_one]  # each once, no padding duplicates
    for a, b in zip(rows_one, rows_two):
        assert a["label"] == b["label"] and [c for c, _ in a["top5"]][:1] == [c for c, _ in b["top5"]][:1]
        pa, pb = dict(map(tuple, a["top5"])), dict(map(tuple, b["top5"]))
        for c in pa.keys() & pb.keys():
            assert pa[c] == pytest.approx(pb[c], abs=1e-6), (a["video"], c)


# ---------------------------------------------------------------------------------------------------
# 4. The best checkpoint

def test_best_checkpoint_is_the_first_highest_val_top1_and_survives_pruning(trained, best_eval):
    val = val_lines(trained)
    assert [m["step"] for m in val] == [1, 2, 3, 4, 5]
    best = max(val, key=lambda m: (m["top1"], -m["step"]))["step"]
    # the fixture must exercise what is tested: the best moved after step 1, later steps tie or drop
    assert best not in (1, 5) and any(m["top1"] == val[best - 1]["top1"] for m in val[best:]), \
        f"fixture no longer exercises best/ties/pruning: val top1 {[m['top1'] for m in val]}"
    folder = os.path.join(trained, "checkpoints")
    assert os.path.islink(os.path.join(folder, "best"))
    assert os.readlink(os.path.join(folder, "best")) == f"step_{best:07d}"
    assert json.load(open(os.path.join(folder, "best", "trainer_state.json")))["step"] == best
    # save_total_limit 1 keeps the last step, and the best on top of it
    assert sorted(os.listdir(folder)) == ["best", f"step_{best:07d}", "step_0000005"]
    # and it evaluates: the eval_only of checkpoints/best reproduces that step's val top-1
    result = json.load(open(os.path.join(best_eval, "eval.json")))["datasets"]["evalset"]
    assert result["top1"] == pytest.approx(val[best - 1]["top1"], abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# 5. predict.py

def test_predict_files_folder_and_records_match_eval(evalset, synthetic_dir, trained, best_eval, tmp_path, capsys):
    samples = eval_samples(evalset, synthetic_dir)
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(samples[1].video, folder / ("a_" + os.path.basename(samples[1].video)))
    (folder / "b_broken.mp4").write_bytes(np.random.default_rng(2).bytes(3000))
    shutil.copy(samples[2].video, folder / ("c_" + os.path.basename(samples[2].video)))
    (folder / "notes.txt").write_text("not a video")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"messages": s.messages, "videos": [s.video], "action_label": s.label}) + "\n"
                               for s in samples[3:5]))
    capsys.readouterr()
    predict.main(["--checkpoint", os.path.join(trained, "checkpoints", "best"), samples[0].video, str(folder),
                  str(records), "--json", "--top_k", "5", "--batch_size", "2"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    expected_videos = [samples[0].video, str(folder / ("a_" + os.path.basename(samples[1].video))),
                       str(folder / "b_broken.mp4"), str(folder / ("c_" + os.path.basename(samples[2].video))),
                       samples[3].video, samples[4].video]
    assert [os.path.realpath(r["video"]) for r in lines] == [os.path.realpath(v) for v in expected_videos]
    assert "error" in lines[2] and "top" not in lines[2] and "b_broken.mp4" in captured.err
    assert [r["label"] for r in lines[4:]] == [samples[3].label, samples[4].label]

    evaluated = {r["video"]: dict(map(tuple, r["top5"])) for r in read_jsonl(os.path.join(best_eval, "predictions.jsonl"))}
    originals = [samples[0].video, samples[1].video, None, samples[2].video, samples[3].video, samples[4].video]
    for result, original in zip(lines, originals):
        if original is None:
            continue
        probs = [t["prob"] for t in result["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert all(t["class"] == CLASSES[t["index"]] for t in result["top"])
        for t in result["top"]:  # the same sampling as eval, so the same probabilities
            assert t["prob"] == pytest.approx(evaluated[original][t["index"]], abs=TOL), (original, t)


def test_predict_rejects_a_class_list_that_disagrees_with_the_head(trained, evalset, synthetic_dir, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(os.path.join(trained, "checkpoints", "best"), copy)
    (copy / "classes.json").write_text(json.dumps({"default": CLASSES[:5]}))
    with pytest.raises(SystemExit) as err:
        predict.main(["--checkpoint", str(copy), eval_samples(evalset, synthetic_dir)[0].video])
    message = str(err.value).replace(str(copy), "CKPT")
    assert "classes.json" in message and re.search(r"\b5\b", message) and re.search(r"\b6\b", message), message
