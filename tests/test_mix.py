"""Mixing datasets (issue 4): several train/eval datasets, one head per label space on one backbone,
batches that never mix label spaces, and LLaMA-Factory / IVCP files used as they are.

The second label space, `axis`, is the synthetic fixture's clips relabelled by the axis of their
motion: move_left/right -> horizontal, move_up/down -> vertical, grow/shrink -> size.
"""

import copy
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import config
import llamafactory
import data
import predict
import train
from batch_plan import StepLayout, train_batches
from data import load_datasets, load_samples
from video import VideoSettings
from decoder import ActionDecoder

EXCERPT = Path(__file__).resolve().parent / "data" / "ivcp_ucf101_excerpt.json"
SYNTHETIC_CLASSES = ["move_left", "move_right", "move_up", "move_down", "grow", "shrink"]
AXIS_CLASSES = ["horizontal", "vertical", "size"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_metrics(output_dir):
    return read_jsonl(os.path.join(output_dir, "metrics.jsonl"))


def dataset_arg(entries):
    """A YAML flow list for --train_datasets / --eval_datasets."""
    return "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}" for e in entries) + "]"


@pytest.fixture(scope="module")
def axis_dir(synthetic_dir, tmp_path_factory):
    """The fixture's train/val records relabelled into the 3-class `axis` space, in a folder of their
    own (with its classes.json); the videos stay in the fixture (video_root)."""
    out = tmp_path_factory.mktemp("axis")
    for split in ("train", "val"):
        records = read_jsonl(os.path.join(synthetic_dir, f"{split}.jsonl"))
        for r in records:
            r["action_label"] //= 2  # 0,1 -> horizontal; 2,3 -> vertical; 4,5 -> size
        write_jsonl(out / f"{split}.jsonl", records)
    (out / "classes.json").write_text(json.dumps(AXIS_CLASSES))
    return str(out)


def capture_initial_heads(monkeypatch):
    """Wraps train.build_classifier to keep a copy of every head's weights as built (before training)."""
    initial = {}
    build = train.build_classifier

    def wrapped(cfg, sizes, processor=None):
        processor, model = build(cfg, sizes, processor)
        for space, head in model.heads.items():
            initial[space] = copy.deepcopy({k: v.detach().clone() for k, v in head.state_dict().items()})
        return processor, model
    monkeypatch.setattr(train, "build_classifier", wrapped)
    return initial


# ---------------------------------------------------------------------------------------------------
# a mixed run: two datasets in two label spaces

def test_mixed_run_trains_both_heads_reports_each_dataset_and_predicts_by_head(
        base_args, synthetic_dir, axis_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    initial = capture_initial_heads(monkeypatch)
    train_sets = [{"path": f"{synthetic_dir}/train.jsonl", "weight": 1.0},
                  {"path": f"{axis_dir}/train.jsonl", "video_root": synthetic_dir, "weight": 0.5, "label_space": "axis"}]
    eval_sets = [{"path": f"{synthetic_dir}/val.jsonl"},
                 {"path": f"{axis_dir}/val.jsonl", "video_root": synthetic_dir, "label_space": "axis"}]
    # one epoch: default 24 samples / 4 = 6 steps, axis round(0.5 * 24) / 4 = 3 steps
    train.main(base_args + ["--label_spaces", "{axis: 3}", "--train_datasets", dataset_arg(train_sets),
                            "--eval_datasets", dataset_arg(eval_sets), "--max_steps", "-1", "--eval_steps", "4",
                            "--num_train_epochs", "1", "--learning_rate", "3e-3", "--warmup_steps", "0"])
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics if m["split"] == "train"] == list(range(1, 10))

    # checkpoints/best: the step with the best mean of top1 over the eval datasets (the first of equals)
    evals = [m for m in metrics if m["split"] == "val"]
    mean = {step: np.mean([m["top1"] for m in evals if m["step"] == step]) for step in (4, 8, 9)}
    assert os.readlink(out / "checkpoints" / "best") == f"step_{max(mean, key=lambda s: (mean[s], -s)):07d}"

    # each eval dataset its own TensorBoard curves, with metrics.jsonl's values
    events = EventAccumulator(str(out)).Reload()
    for m in evals:
        for key in ("top1", "loss"):
            (point,) = [e for e in events.Scalars(f"val/{m['dataset']}/{key}") if e.step == m["step"]]
            assert point.value == pytest.approx(m[key])
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("val/") and tag.count("/") == 1]

    # each eval dataset reported on its own line, with its label space and every sample counted once
    val = [m for m in evals if m["step"] == 9]
    assert len(val) == 2
    by_space = {m["label_space"]: m for m in val}
    assert set(by_space) == {"default", "axis"}
    assert len({m["dataset"] for m in val}) == 2 and "axis" in by_space["axis"]["dataset"]
    assert by_space["default"]["count"] == by_space["axis"]["count"] == 12
    for m in val:
        assert 0 <= m["top1"] <= m["top5"] <= 1 and math.isfinite(m["loss"])
    assert by_space["axis"]["top5"] == 1.0  # only 3 classes: the axis head (3 outputs) scored it

    # one head per label space in the checkpoint, with its class count; both trained
    ckpt = out / "checkpoints" / "step_0000009"
    assert sorted(os.listdir(ckpt / "heads")) == ["axis", "default"]
    assert set(initial) == {"axis", "default"}
    for space, n in [("default", 6), ("axis", 3)]:
        head = ActionDecoder.from_pretrained(str(ckpt / "heads" / space))
        assert head.config["num_classes"] == n
        trained = head.state_dict()
        assert trained.keys() == initial[space].keys()
        changed = [k for k in trained if not torch.equal(trained[k].float(), initial[space][k].float())]
        assert changed, f"head {space!r} did not change in training"
    assert json.loads((ckpt / "classes.json").read_text()) == {"default": SYNTHETIC_CLASSES, "axis": AXIS_CLASSES}

    # predict picks the head by name and prints that space's class names
    video = os.path.join(synthetic_dir, read_jsonl(os.path.join(synthetic_dir, "val.jsonl"))[0]["videos"][0])
    capsys.readouterr()
    predict.main(["--checkpoint", str(ckpt), video, "--label_space", "axis", "--top_k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == video
    assert sorted(line.split()[-1] for line in lines[1:]) == sorted(AXIS_CLASSES)
    predict.main(["--checkpoint", str(ckpt), video, "--top_k", "6", "--json"])  # no --label_space: default
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(t["class"] for t in result["top"]) == sorted(SYNTHETIC_CLASSES)
    with pytest.raises(SystemExit, match="'nope'.*heads.*default.*axis|'nope'.*heads.*axis.*default"):
        predict.main(["--checkpoint", str(ckpt), video, "--label_space", "nope"])


def test_eval_batches_never_mix_label_spaces(base_args, synthetic_dir, axis_dir, tmp_path):
    """Eval sets whose sizes do not line up with the eval batch size (12 default + 7 axis samples in
    batches of 5): a batch must still hold one label space, and each dataset is counted whole."""
    axis_val = write_jsonl(tmp_path / "axis7" / "val.jsonl", read_jsonl(f"{axis_dir}/val.jsonl")[:7])
    eval_sets = [{"path": f"{synthetic_dir}/val.jsonl"},
                 {"path": axis_val, "video_root": synthetic_dir, "label_space": "axis"}]
    train.main(base_args + ["--label_spaces", "{axis: 3}", "--eval_datasets", dataset_arg(eval_sets),
                            "--per_device_eval_batch_size", "5", "--max_steps", "1"])
    val = {m["label_space"]: m for m in read_metrics(str(tmp_path / "run")) if m["split"] == "val"}
    assert val["default"]["count"] == 12 and val["axis"]["count"] == 7


# ---------------------------------------------------------------------------------------------------
# the training plan: batch_plan.train_batches

SIZES, WEIGHTS = [24, 37, 10], [1.0, 0.5, 2.3]  # a weight above 1 draws some samples twice
SETTINGS = [(1, 1, 1), (4, 1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (3, 1, 2), (2, 2, 3), (1, 4, 1), (1, 1, 4)]


def dataset_of(index):
    return int(np.searchsorted(np.cumsum(SIZES), index, side="right"))


def plan(batch, accumulation, world, epoch=0, seed=7, lengths=None):
    """Every rank's micro-batches, as global indices."""
    ranks = []
    for rank in range(world):
        micros = train_batches(SIZES, WEIGHTS, StepLayout(batch, accumulation, world, rank), epoch, seed, lengths)
        assert all(tuple(key)[1:] == (epoch, True) for micro in micros for key in micro)  # (index, epoch, train)
        ranks.append([[int(key[0]) for key in micro] for micro in micros])
    return ranks


def step_groups(ranks, accumulation):
    """The samples of each optimizer step, over all ranks and micro-batches."""
    steps = len(ranks[0]) // accumulation
    return [[j for r in ranks for micro in r[s * accumulation:(s + 1) * accumulation] for j in micro]
            for s in range(steps)]


@pytest.mark.parametrize("batch,accumulation,world", SETTINGS)
@pytest.mark.parametrize("epoch", [0, 1])
def test_train_batches_one_dataset_per_batch_and_step_weighted_counts(batch, accumulation, world, epoch):
    ranks = plan(batch, accumulation, world, epoch)
    per_step = batch * accumulation * world
    # all ranks step in lockstep: the same number of micro-batches, each full
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) % accumulation == 0
    for r in ranks:
        for micro in r:
            assert len(micro) == batch
            assert len({dataset_of(j) for j in micro}) == 1, f"micro-batch {micro} mixes datasets"
    # the union over ranks and micro-batches of a step is one dataset's group of per_step samples
    groups = step_groups(ranks, accumulation)
    assert all(len(g) == per_step and len({dataset_of(j) for j in g}) == 1 for g in groups)
    # per epoch, dataset d contributes round(weight * size) samples, less the remainder that does not
    # fill a step; drawn without replacement while it can: every index floor or ceil times
    offsets = np.cumsum([0] + SIZES)
    for d, (size, weight) in enumerate(zip(SIZES, WEIGHTS)):
        count = round(weight * size)
        used = count - count % per_step
        drawn = Counter(j for g in groups for j in g if dataset_of(j) == d)
        assert sum(drawn.values()) == used
        assert set(drawn) <= set(range(offsets[d], offsets[d + 1]))
        if used:
            times = [drawn.get(j, 0) for j in range(offsets[d], offsets[d + 1])]
            assert min(times) >= used // size and max(times) <= -(-used // size), (d, times)
    assert len(groups) == sum(round(w * s) // per_step for s, w in zip(SIZES, WEIGHTS))


def test_train_batches_same_step_groups_for_any_split_of_the_step():
    """The same batch x accumulation x world product trains on the same samples at every step."""
    reference = [Counter(g) for g in step_groups(plan(4, 1, 1), 1)]
    for batch, accumulation, world in [(2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4), (1, 4, 1)]:
        assert [Counter(g) for g in step_groups(plan(batch, accumulation, world), accumulation)] == reference


def test_train_batches_epochs_reshuffle_and_reruns_repeat():
    assert plan(2, 1, 2, epoch=0) == plan(2, 1, 2, epoch=0)
    assert plan(2, 1, 2, epoch=0) != plan(2, 1, 2, epoch=1)
    assert plan(2, 1, 2, epoch=0, seed=1) != plan(2, 1, 2, epoch=0, seed=2)


def test_train_batches_grouped_by_length_keep_samples_and_datasets():
    lengths = np.random.default_rng(0).integers(10, 1000, size=sum(SIZES))
    for batch, accumulation, world in [(2, 2, 1), (1, 2, 2), (3, 1, 2)]:
        plain, grouped = plan(batch, accumulation, world), plan(batch, accumulation, world, lengths=lengths)
        flat = lambda ranks: Counter(j for r in ranks for micro in r for j in micro)  # noqa: E731
        assert flat(plain) == flat(grouped)
        for g in step_groups(grouped, accumulation):
            assert len({dataset_of(j) for j in g}) == 1


# ---------------------------------------------------------------------------------------------------
# one label space over several files; undeclared label spaces; the `name` key

def test_one_label_space_over_two_files_keeps_one_head(base_args, synthetic_dir, tmp_path):
    train_records = read_jsonl(f"{synthetic_dir}/train.jsonl")
    other = write_jsonl(tmp_path / "other" / "train.jsonl", train_records[:8])  # same space, other folder
    other_val = write_jsonl(tmp_path / "other" / "val.jsonl", read_jsonl(f"{synthetic_dir}/val.jsonl")[:5])
    train_sets = [{"path": f"{synthetic_dir}/train.jsonl"}, {"path": other, "video_root": synthetic_dir, "weight": 2.0}]
    eval_sets = [{"path": f"{synthetic_dir}/val.jsonl"}, {"path": other_val, "video_root": synthetic_dir}]
    train.main(base_args + ["--train_datasets", dataset_arg(train_sets), "--eval_datasets", dataset_arg(eval_sets),
                            "--max_steps", "2"])
    out = tmp_path / "run"
    assert sorted(os.listdir(out / "checkpoints" / "step_0000002" / "heads")) == ["default"]
    val = [m for m in read_metrics(str(out)) if m["split"] == "val"]
    assert sorted(m["count"] for m in val) == [5, 12] and {m["label_space"] for m in val} == {"default"}
    assert len({m["dataset"] for m in val}) == 2


@pytest.mark.parametrize("key", ["train_datasets", "eval_datasets"])
def test_undeclared_label_space_names_the_dataset_and_the_fix(base_args, synthetic_dir, axis_dir, key):
    entry = dataset_arg([{"path": f"{axis_dir}/train.jsonl", "video_root": synthetic_dir, "label_space": "axis"}])
    with pytest.raises(SystemExit) as err:
        train.main(base_args + [f"--{key}", entry, "--max_steps", "1"])
    message = str(err.value)
    assert "'axis'" in message and f"{axis_dir}/train.jsonl" in message
    assert "label_spaces" in message and "axis: NUM_CLASSES" in message


def test_dataset_entry_name_is_accepted_and_names_the_dataset(base_args, synthetic_dir, axis_dir):
    entries = [{"path": f"{synthetic_dir}/val.jsonl", "name": "motion"},
               {"path": f"{axis_dir}/val.jsonl", "video_root": synthetic_dir, "label_space": "axis", "name": "axes"}]
    cfg = llamafactory.parse_config(base_args + ["--label_spaces", "{axis: 3}", "--eval_datasets", dataset_arg(entries)])
    mix = load_datasets(cfg.eval_datasets, config.head_sizes(cfg), VideoSettings(4, 8, None, 3136, 3136), 0.01)
    assert mix.names == ["motion", "axes"] and mix.spaces == ["default", "axis"]


def test_a_stand_in_for_an_unreadable_video_comes_from_the_same_label_space(synthetic_dir, axis_dir, tmp_path):
    """The last record of the first dataset has a broken video: whatever stands in for it must not
    come from the next dataset (another label space), or its micro-batch mixes label spaces."""
    folder = tmp_path / "broken"
    records = read_jsonl(f"{synthetic_dir}/train.jsonl")[:6]
    (folder / "videos").mkdir(parents=True)
    (folder / "videos" / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    records[-1] = {**records[-1], "videos": ["videos/bad.mp4"]}
    first = write_jsonl(folder / "train.jsonl", records)
    for name in {r["videos"][0] for r in records[:-1]}:
        shutil.copy(os.path.join(synthetic_dir, name), folder / name)
    entries = [{"path": first}, {"path": f"{axis_dir}/train.jsonl", "video_root": synthetic_dir, "label_space": "axis"}]
    mix = load_datasets(entries, {"default": 6, "axis": 3}, VideoSettings(4, 8, None, 3136, 3136), 0.5)
    for train_mode in (True, False):
        item = mix.dataset[(5, 0, train_mode)]
        assert item.skipped and "bad.mp4" in item.skipped[0]
        assert item.sample.label_space == "default", \
            f"the stand-in for {records[-1]['videos'][0]} came from label space {item['sample'].label_space!r}"


# ---------------------------------------------------------------------------------------------------
# LLaMA-Factory / IVCP files as they are

@pytest.fixture(scope="module")
def ivcp_media(tmp_path_factory):
    """A media folder with a tiny real video at every path the excerpt references."""
    from prepare.synthetic import make_clip, write_video

    root = tmp_path_factory.mktemp("media")
    one = root / "one.avi"
    write_video(one, make_clip(0, np.random.default_rng(0), 64, 8), fps=8)
    for record in json.loads(EXCERPT.read_text()):
        target = root / record["videos"][0]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(one, target)
    return str(root)


def test_ivcp_excerpt_validates_with_its_own_labels(ivcp_media):
    records = json.loads(EXCERPT.read_text())
    assert len(records) == 30 and not (EXCERPT.parent / "classes.json").exists()
    assert all(r["videos"][0].startswith("UCF101/") for r in records)
    samples, bad = load_samples(str(EXCERPT), ivcp_media, 101)
    assert bad == []
    assert [s.label for s in samples] == [r["action_label"] for r in records]
    assert [s.video for s in samples] == [os.path.join(ivcp_media, r["videos"][0]) for r in records]
    assert [s.source for s in samples] == [f"{EXCERPT}:{i}" for i in range(1, 31)]
    assert [s.messages for s in samples] == [r["messages"] for r in records]
    # without the media folder the paths resolve next to the file, where there are no videos
    with pytest.raises(data.DataError, match="30 of 30 samples have unusable videos"):
        load_datasets([{"path": str(EXCERPT)}], {"default": 101}, VideoSettings(4, 8, None, 3136, 3136), 0.01)


def test_ivcp_excerpt_trains_and_evaluates_as_is(base_args, ivcp_media, tmp_path, capsys):
    entry = dataset_arg([{"path": str(EXCERPT), "video_root": ivcp_media}])
    train.main(base_args + ["--num_action_classes", "101", "--train_datasets", entry, "--eval_datasets", entry,
                            "--per_device_eval_batch_size", "8", "--max_steps", "2"])
    printed = capsys.readouterr().out
    assert "30 train samples" in printed and "2 steps" in printed
    metrics = read_metrics(str(tmp_path / "run"))
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    val = [m for m in metrics if m["split"] == "val"]
    assert len(val) == 1 and val[0]["count"] == 30 and val[0]["label_space"] == "default"
    head = ActionDecoder.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step_0000002" / "heads" / "default"))
    assert head.config["num_classes"] == 101
