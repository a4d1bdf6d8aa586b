"""Shared fixtures: tiny random checkpoint directories (Qwen2.5-VL, and one per family for the tests
that run on every family) and a small generated dataset, built once per test session from the same
prepare/ scripts the demo uses."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prepare.synthetic import main as make_synthetic  # noqa: E402
from prepare.tiny_model import FAMILIES, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny-qwen2.5-vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_family_model_dir(tmp_path_factory, tiny_model_dir):
    """family name (prepare/tiny_model.py FAMILIES) -> a tiny random checkpoint of that Qwen-VL family,
    written at most once per session; qwen2_5_vl is `tiny_model_dir` itself."""
    written = {"qwen2_5_vl": tiny_model_dir}

    def get(family):
        if family not in written:
            folder = tmp_path_factory.mktemp("model") / f"tiny-{family}"
            written[family] = write_tiny_model(str(folder), seed=0, family=family)
        return written[family]
    return get


@pytest.fixture(scope="session", params=list(FAMILIES))  # every Qwen-VL family, by model_type
def family_model_dir(request, tiny_family_model_dir):
    """A tiny random checkpoint of each family in turn (tests that take it run once per family)."""
    return tiny_family_model_dir(request.param)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(["--out", str(out), "--train", "24", "--val", "12", "--size", "64", "--frames", "8",
                    "--fps", "8", "--workers", "1"])
    return str(out)


@pytest.fixture
def base_args(tiny_model_dir, synthetic_dir, tmp_path):
    """CLI overrides for a small, fast run of train.main on the fixtures."""
    return ["--config", os.path.join(ROOT, "configs", "synthetic.yaml"),
            "--model_name_or_path", tiny_model_dir,
            "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]",
            "--eval_datasets", f"[{{path: {synthetic_dir}/val.jsonl}}]",
            "--video_min_pixels", "3136", "--video_max_pixels", "3136",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6",
            "--dataloader_num_workers", "0", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
            "--output_dir", str(tmp_path / "run")]
