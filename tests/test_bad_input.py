"""Bad input: each case gives a clear message (file, line or key; what is wrong; what to do) and a
non-zero exit, or, for unusable videos, a counted skip within max_bad_video_fraction."""

import json
import os
import pickle
import shutil

import pytest

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
    from model import build_classifier, load_weights

    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])
    cfg = train.parse_config(base_args + ["--num_action_classes", "7"])
    _, model = build_classifier(cfg, train.head_sizes(cfg))
    with pytest.raises(ValueError, match="head 'default' is .*'num_classes': 6.*'num_classes': 7"):
        load_weights(model, str(tmp_path / "run" / "checkpoints" / "step_0000001"))


def test_checkpoint_from_another_base_model_is_refused(base_args, tmp_path, tiny_model_dir):
    from prepare.tiny_model import write_tiny_model

    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])
    other = write_tiny_model(str(tmp_path / "other-model"), hidden=32, layers=1, heads=2)
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
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto"])
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_disk_full_during_save_keeps_the_previous_checkpoint(base_args, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "run"
    train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]"])

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train, "save_weights", no_space)  # the first file a save writes
    with pytest.raises(SystemExit):
        train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto"])
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_0000001) is intact" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001"]  # no half-written folder either
    monkeypatch.undo()
    train.main(base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--resume", "auto"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001", "step_0000002"]
