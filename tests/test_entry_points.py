"""A user's mistake, through each entry point as a user runs it (a subprocess): a non-zero exit, one
message naming the file / line / key and what to do, and no traceback. Tracebacks are for bugs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("entry") / "run"
    train.main(["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", tiny_model_dir,
                "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]", "--eval_datasets", "[]",
                "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--per_device_train_batch_size", "4",
                "--dataloader_num_workers", "0", "--max_steps", "1", "--output_dir", str(out)])
    return str(out / "checkpoints" / "step_0000001")


def assert_user_error(code, output, *fragments):
    assert code != 0, output
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in output, output[-3000:]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("learning_rate: 1.0e-4\ntrain_datasets: [{path: x.jsonl}\nmax_steps: 3\n")  # unclosed [
    code, output = run("train.py", "--config", config)
    assert_user_error(code, output, f"{config}:3:", "YAML syntax error")


def test_unreadable_records_file(tmp_path, tiny_model_dir):
    records = tmp_path / "train.jsonl"
    records.write_bytes(b"\xff\xfe not utf-8\n")
    code, output = run("train.py", "--config", "configs/synthetic.yaml", "--model_name_or_path", tiny_model_dir,
                       "--train_datasets", f"[{{path: {records}}}]", "--eval_datasets", "[]")
    assert_user_error(code, output, f"{records}: not UTF-8 text")


def test_eval_only_with_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_model_dir, synthetic_dir):
    code, output = run("train.py", "--config", "configs/synthetic.yaml", "--model_name_or_path", tiny_model_dir,
                       "--eval_only", "true", "--checkpoint", tmp_path, "--output_dir", tmp_path / "eval",
                       "--eval_datasets", f"[{{path: {synthetic_dir}/val.jsonl}}]")
    assert_user_error(code, output, f"{tmp_path}: cannot read trainable.safetensors")


def test_predict_with_a_folder_that_is_not_a_checkpoint(tmp_path, synthetic_dir):
    code, output = run("predict.py", "--checkpoint", tmp_path, os.path.join(synthetic_dir, "videos"))
    assert_user_error(code, output, f"{tmp_path}: neither a checkpoint folder")


def test_predict_on_a_video_that_does_not_exist(checkpoint, tmp_path):
    code, output = run("predict.py", "--checkpoint", checkpoint, tmp_path / "nope.mp4")
    assert_user_error(code, output, f"{tmp_path / 'nope.mp4'}: no such file or folder")


@pytest.mark.parametrize("content", ["{not json", json.dumps(["a", "b"])])
def test_predict_with_a_malformed_classes_json(checkpoint, synthetic_dir, tmp_path, content):
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    (copy / "classes.json").write_text(content)
    code, output = run("predict.py", "--checkpoint", copy, os.path.join(synthetic_dir, "videos", "val_00000.mp4"))
    assert_user_error(code, output, f"{copy / 'classes.json'}:")


def test_prepare_ucf101_without_its_split_lists(tmp_path):
    code, output = run("prepare/ucf101.py", "--root", tmp_path, "--splits", tmp_path / "lists", "--out", tmp_path / "out")
    assert_user_error(code, output, "classInd.txt: not found")


def test_prepare_sthsthv2_with_labels_that_are_not_json(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "labels.json").write_text("{'single quotes': 1}")
    code, output = run("prepare/sthsthv2.py", "--root", tmp_path, "--labels", tmp_path / "labels", "--out", tmp_path / "out")
    assert_user_error(code, output, "labels.json: not valid JSON")
