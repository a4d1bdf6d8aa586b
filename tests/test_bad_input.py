"""Bad input: each case gives a clear message (file, line or key; what is wrong; what to do) and a
non-zero exit, or, for unusable videos, a counted skip within max_bad_video_fraction."""

import json
import os
import pickle
import shutil

import pytest

import config
import llamafactory
import train

GOOD = {"messages": [{"role": "user", "content": "<video>What action is being performed in this video?"},
                     {"role": "assistant", "content": "The action being performed is <ACT>."}],
        "videos": ["videos/train_00000.mp4"], "action_label": 1}


def dataset_with(tmp_path, synthetic_dir, records, name="bad.jsonl", raw=None):
    """A dataset file next to a copy of the fixture videos (relative paths resolve there)."""
    folder = tmp_path / "ds"
    if not folder.exists():
        shutil.copytree(synthetic_dir, folder)
    path = folder / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_expecting_error(base_args, path, *extra):
    with pytest.raises(SystemExit) as err:
        train.main(base_args + ["--train_datasets", f"[{{path: {path}}}]", "--eval_datasets", "[]",
                                "--max_steps", "1", *extra])
    return str(err.value.code if err.value.code is not None else err.value)


def with_record(**changes):
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key == "user":
            record["messages"][0]["content"] = value
        elif key == "assistant":
            record["messages"][1]["content"] = value
        elif value is None:
            record.pop(key)
        else:
            record[key] = value
    return record


@pytest.mark.parametrize("change,expected", [
    ({"user": "What is happening?"}, "the user turn must contain <video> exactly once (found 0)"),
    ({"assistant": "It is running."}, "the assistant turn must contain <ACT> exactly once (found 0)"),
    ({"assistant": "<ACT> or <ACT>"}, "the assistant turn must contain <ACT> exactly once (found 2)"),
    ({"action_label": None}, "`action_label` is missing"),
    ({"action_label": "3"}, "`action_label` must be an int, got '3'"),
    ({"action_label": 2.0}, "`action_label` must be an int, got 2.0"),
    ({"action_label": -1}, "`action_label` -1 is outside [0, 6)"),
    ({"action_label": 6}, "`action_label` 6 is outside [0, 6)"),
], ids=["no_video_token", "no_act", "act_twice", "label_missing", "label_str", "label_float", "label_negative",
        "label_too_big"])
def test_bad_record_names_file_and_line(base_args, tmp_path, synthetic_dir, change, expected):
    path = dataset_with(tmp_path, synthetic_dir, [GOOD, GOOD, with_record(**change)])
    message = run_expecting_error(base_args, path)
    assert f"{path}:3: {expected}" in message


def test_all_bad_records_reported_together(base_args, tmp_path, synthetic_dir):
    path = dataset_with(tmp_path, synthetic_dir, [with_record(action_label=9), GOOD, with_record(assistant="x")])
    message = run_expecting_error(base_args, path)
    assert "2 problem(s)" in message and f"{path}:1:" in message and f"{path}:3:" in message


@pytest.mark.parametrize("raw,expected", [
    (None, "dataset file not found"),
    (b"", "dataset file is empty"),
    (b'{"messages": [}\n', ":1: not valid JSON"),
    ('{"videos": ["caf\u00e9.mp4"]}\n'.encode("latin-1"), "not UTF-8"),
], ids=["missing", "empty", "not_json", "not_utf8"])
def test_bad_dataset_file(base_args, tmp_path, synthetic_dir, raw, expected):
    path = dataset_with(tmp_path, synthetic_dir, [], raw=raw if raw is not None else b"x")
    if raw is None:
        os.remove(path)
    message = run_expecting_error(base_args, path)
    assert path in message and expected in message


def test_json_array_errors_name_the_record(base_args, tmp_path, synthetic_dir):
    path = dataset_with(tmp_path, synthetic_dir, [], name="bad.json",
                        raw=json.dumps([GOOD, with_record(action_label=99)]).encode())
    assert f"{path}:2: `action_label` 99 is outside [0, 6)" in run_expecting_error(base_args, path)


def test_num_classes_disagreeing_with_classes_json(base_args, tmp_path, synthetic_dir):
    path = dataset_with(tmp_path, synthetic_dir, [GOOD] * 8)
    message = run_expecting_error(base_args, path, "--num_action_classes", "7")
    assert "classes.json lists 6 classes but label space 'default' has 7" in message


def test_missing_and_empty_videos_beyond_the_tolerance_fail_with_a_list(base_args, tmp_path, synthetic_dir):
    records = [GOOD] * 6 + [with_record(videos=["videos/nope.mp4"]), with_record(videos=["videos/empty.mp4"])]
    path = dataset_with(tmp_path, synthetic_dir, records)
    (tmp_path / "ds" / "videos" / "empty.mp4").write_bytes(b"")
    message = run_expecting_error(base_args, path)
    assert "2 of 8 samples have unusable videos (25.0%)" in message and "max_bad_video_fraction=0.01" in message
    assert f"{path}:7: video" in message and "nope.mp4 not found" in message
    assert f"{path}:8: video" in message and "is empty (0 bytes)" in message
    assert "video_root" in message  # what to do


def test_missing_videos_within_the_tolerance_are_skipped_and_reported(base_args, tmp_path, synthetic_dir, capsys):
    path = dataset_with(tmp_path, synthetic_dir, [GOOD] * 8 + [with_record(videos=["videos/nope.mp4"])])
    train.main(base_args + ["--train_datasets", f"[{{path: {path}}}]", "--eval_datasets", "[]", "--max_steps", "1",
                            "--max_bad_video_fraction", "0.2"])
    out = capsys.readouterr().out
    assert "skipping them: 1 of 9 samples have unusable videos" in out and "nope.mp4 not found" in out


def test_checkpoint_with_other_class_count_is_refused(base_args, tmp_path):
    from checkpoint import load_weights
    from model import build_classifier

    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])
    cfg = llamafactory.parse_config(base_args + ["--num_action_classes", "7"])
    _, model = build_classifier(cfg, config.head_sizes(cfg))
    with pytest.raises(ValueError, match="head 'default' is .*'num_classes': 6.*'num_classes': 7"):
        load_weights(model, str(tmp_path / "run" / "checkpoints" / "step_0000001"))


def test_checkpoint_from_another_base_model_is_refused(base_args, tmp_path, tiny_model_dir):
    from prepare.tiny_model import TinySize, write_tiny_model

    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])
    other = write_tiny_model(str(tmp_path / "other-model"), TinySize(hidden=32, layers=1, heads=2))
    with pytest.raises(SystemExit, match="was trained on .*tiny-qwen2.5-vl.*model_name_or_path is .*other-model"):
        train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto",
                                "--model_name_or_path", other])


def test_non_finite_loss_stops_with_step_and_records_named(base_args, tmp_path):
    out = tmp_path / "run"
    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])
    before = {f: (out / "checkpoints" / "step_0000001" / f).read_bytes() for f in ("trainable.safetensors", "optimizer.pt")}
    # an absurd learning rate without clipping blows the weights up within a few steps
    with pytest.raises(SystemExit, match=r"non-finite loss at step \d+: loss (nan|inf) .*records \[.*train.jsonl:\d+"):
        train.main(base_args + ["--max_steps", "10", "--eval_datasets", "[]", "--resume", "auto",
                                "--learning_rate", "1e38", "--max_grad_norm", "0", "--lr_scheduler_type", "constant"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001"]
    assert all((out / "checkpoints" / "step_0000001" / f).read_bytes() == b for f, b in before.items())


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_checkpoint_that_runs_code_on_unpickling_is_refused(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])
    with open(tmp_path / "run" / "checkpoints" / "step_0000001" / "optimizer.pt", "wb") as f:
        pickle.dump(RunsCode(), f)
    # refused unread: the only checkpoint cannot be read, which --resume auto says, naming the file
    with pytest.raises(SystemExit, match="optimizer.pt is not a torch.save archive|[Ww]eights only load failed"):
        train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto"])
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_disk_full_during_save_keeps_the_previous_checkpoint(base_args, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "run"
    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("checkpoint.save_weights", no_space)  # the first file a save writes
    with pytest.raises(SystemExit):
        train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto"])
    err = capsys.readouterr().err
    assert "failed: the disk is full. The last complete checkpoint, " in err and "step_0000001, is intact" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001"]  # no half-written folder either
    monkeypatch.undo()
    train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001", "step_0000002"]


# ---------------------------------------------------------------------------------------------------
# Per-sample video problems found only while decoding (issue 7): truncated files, files that are not
# videos, and files whose container promises more frames than they hold. Each is skipped (another
# sample stands in), counted and reported; more than max_bad_video_fraction of them fails the run.

def _packets(path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.frames, [(p.pos, p.size) for p in container.demux(stream) if p.size]


def _faststart_mp4(path, frames):
    """H.264 in an MP4 whose index (moov) comes first: it lists every frame before any frame's data."""
    import av

    with av.open(str(path), "w", options={"movflags": "+faststart", "fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count, stream.options = 1, {"bf": "0", "preset": "veryfast"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def make_broken_video(kind, folder):
    """Writes a broken video into `folder` (a copy of the synthetic fixture); returns its name
    relative to the folder. Each kind is checked to be what it claims."""
    import numpy as np
    from prepare.synthetic import make_clip

    folder = os.fspath(folder)
    if kind == "truncated_mp4":  # an interrupted download: the MP4 index (at the end) never arrived
        whole = open(os.path.join(folder, "videos/train_00000.mp4"), "rb").read()
        name, cut = "videos/truncated.mp4", whole[:len(whole) * 6 // 10]
    elif kind == "truncated_avi":  # cut in the middle of the 5th of 8 frames
        source = os.path.join(folder, "videos/train_00001.avi")
        header, packets = _packets(source)
        assert header == 8 and len(packets) == 8
        pos, size = packets[4]
        name, cut = "videos/truncated.avi", open(source, "rb").read()[:pos + size // 2]
    elif kind == "random_bytes_mp4":
        name, cut = "videos/random.mp4", np.random.default_rng(0).bytes(6000)
    elif kind == "fewer_frames_than_header":  # the index lists 8 frames; the data of 5 and a half
        whole_path = os.path.join(folder, "videos/faststart_whole.mp4")
        _faststart_mp4(whole_path, make_clip(1, np.random.default_rng(1), 64, 8))
        header, packets = _packets(whole_path)
        assert header == 8 and len(packets) == 8
        pos, size = packets[5]
        name, cut = "videos/fewer_frames.mp4", open(whole_path, "rb").read()[:pos + size // 2]
    else:
        raise ValueError(kind)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(cut)
    return name


BROKEN = ["truncated_mp4", "truncated_avi", "random_bytes_mp4", "fewer_frames_than_header"]


def eight_with_one_broken(tmp_path, synthetic_dir, kind, bad_line=5):
    """8 training records of the fixture; the one on `bad_line` points at a broken video."""
    with open(os.path.join(synthetic_dir, "train.jsonl")) as f:
        records = [json.loads(line) for line in f][:8]
    path = dataset_with(tmp_path, synthetic_dir, [], name="eight.jsonl", raw=b"")
    records[bad_line - 1]["videos"] = [make_broken_video(kind, tmp_path / "ds")]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path, records


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_video_is_skipped_whichever_frames_are_sampled(tmp_path, synthetic_dir, kind):
    """The dataset item of a broken video never holds frames of it: it is skipped (the next sample
    stands in) in every epoch, whichever frame offsets that epoch draws."""
    from data import load_samples, VideoDataset
    from video import VideoSettings

    path, records = eight_with_one_broken(tmp_path, synthetic_dir, kind)
    samples, bad = load_samples(path, None, 6)
    assert bad == [] and len(samples) == 8  # present and non-empty: only decoding can tell
    dataset = VideoDataset(samples, VideoSettings(4, 8, None, 3136, 3136), seed=0)
    for epoch in range(6):
        item = dataset[(4, epoch, True)]
        assert len(item.skipped) == 1 and item.skipped[0].startswith(f"{path}:5: "), \
            f"epoch {epoch}: {records[4]['videos'][0]} was used, not skipped"
        assert item.sample is not samples[4] and item.sample.label_space == "default"  # a stand-in
    item = dataset[(4, 0, False)]
    assert item.skipped and not item.valid  # in evaluation the stand-in counts nowhere


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_video_fails_beyond_the_tolerance_and_is_skipped_within_it(base_args, tmp_path, synthetic_dir,
                                                                          kind, capsys):
    path, _ = eight_with_one_broken(tmp_path, synthetic_dir, kind)
    # one epoch (8 samples, batches of 4) reaches every record once
    with pytest.raises(SystemExit) as err:
        train.main(base_args + ["--train_datasets", f"[{{path: {path}}}]", "--eval_datasets", "[]",
                                "--max_steps", "2", "--output_dir", str(tmp_path / "strict")])
    message = str(err.value.code)
    assert f"{path}:5: " in message and "1 of 8" in message and "max_bad_video_fraction=0.01" in message

    capsys.readouterr()
    train.main(base_args + ["--train_datasets", f"[{{path: {path}}}]", "--eval_datasets", "[]",
                            "--max_steps", "2", "--max_bad_video_fraction", "0.2",
                            "--output_dir", str(tmp_path / "tolerant")])
    out = capsys.readouterr().out
    assert "skipped" in out and f"{path}:5: " in out
    with open(tmp_path / "tolerant" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train_lines = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train_lines] == [1, 2]
    assert train_lines[-1]["skipped_videos"] == 1  # counted once, as one bad record
    assert os.path.isdir(tmp_path / "tolerant" / "checkpoints" / "step_0000002")


def test_clip_shorter_than_the_frames_requested_repeats_frames(base_args, tmp_path, synthetic_dir):
    """Not a bad video: a 1-frame clip (2 frames requested at least) and a 3-frame clip with
    video_num_frames 8 train with repeated frames, nothing skipped, at the default tolerance."""
    import numpy as np
    from data import load_samples, VideoDataset
    from video import VideoSettings
    from prepare.synthetic import make_clip, write_video

    with open(os.path.join(synthetic_dir, "train.jsonl")) as f:
        records = [json.loads(line) for line in f][:8]
    path = dataset_with(tmp_path, synthetic_dir, [], name="short.jsonl", raw=b"")
    clip = make_clip(0, np.random.default_rng(0), 64, 3)
    write_video(tmp_path / "ds" / "videos" / "one.avi", clip[:1], fps=8)
    write_video(tmp_path / "ds" / "videos" / "three.mp4", clip, fps=8)
    records[2]["videos"], records[5]["videos"] = ["videos/one.avi"], ["videos/three.mp4"]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    samples, _ = load_samples(path, None, 6)
    for settings, index, frames, shown in [(VideoSettings(4, 8, None, 3136, 3136), 2, 2, 1),
                                           (VideoSettings(4, 8, 8, 3136, 3136), 5, 8, 3)]:
        item = VideoDataset(samples, settings)[(index, 0, True)]
        assert item.skipped == [] and item.sample is samples[index]
        assert len(item.frames) == frames and item.indices.tolist() == sorted(item.indices.tolist())
        assert set(item.indices.tolist()) <= set(range(shown))

    for extra in ([], ["--video_num_frames", "8"]):
        out = tmp_path / f"run{len(extra)}"
        train.main(base_args + ["--train_datasets", f"[{{path: {path}}}]", "--eval_datasets", "[]",
                                "--max_steps", "2", "--output_dir", str(out), *extra])
        with open(out / "metrics.jsonl") as f:
            train_lines = [json.loads(line) for line in f if '"train"' in line]
        assert len(train_lines) == 2 and train_lines[-1]["skipped_videos"] == 0


def test_broken_eval_video_is_reported_and_excluded_not_replaced(base_args, tmp_path, synthetic_dir, capsys):
    """An unreadable eval video is left out of the metrics: they equal those of the eval set without
    it (the sample that stood in for it is not counted in its place)."""
    with open(os.path.join(synthetic_dir, "val.jsonl")) as f:
        records = [json.loads(line) for line in f]
    folder = tmp_path / "ds"
    dataset_with(tmp_path, synthetic_dir, [], name="unused.jsonl", raw=b"")
    records[5]["videos"] = [make_broken_video("random_bytes_mp4", folder)]
    with_bad = str(folder / "val_with_bad.jsonl")
    without = str(folder / "val_without.jsonl")
    with open(with_bad, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(without, "w") as f:
        f.writelines(json.dumps(r) + "\n" for i, r in enumerate(records) if i != 5)

    capsys.readouterr()
    train.main(base_args + ["--eval_datasets", f"[{{path: {with_bad}, name: val}}]", "--max_steps", "1"])
    out = capsys.readouterr().out
    assert "skipped" in out and f"{with_bad}:6: " in out
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        (val,) = [json.loads(line) for line in f if '"val"' in line]
    assert val["count"] == 11 and val["skipped_videos"] == 1

    train.main(base_args + ["--eval_only", "true", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "step_0000001"),
                            "--eval_datasets", f"[{{path: {without}, name: val}}]", "--output_dir", str(tmp_path / "ref")])
    with open(tmp_path / "ref" / "eval.json") as f:
        reference = json.load(f)["datasets"]["val"]
    assert reference["count"] == 11
    for key in ("loss", "top1", "top5", "mean_class_acc"):
        assert val[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
