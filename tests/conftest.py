"""Shared fixtures: tiny random checkpoint directories (Qwen2.5-VL, and one per family for the tests
that run on every family) and a small generated dataset, built from the same prepare/ scripts the
demo uses. Each is built once per test run, whichever pytest-xdist worker asks first: the others wait
for it and read the same folder (nothing writes into these folders after they are built)."""

import fcntl
import os
import sys

# pytest-xdist runs one process per core: each gets its share of the cores (torch would take them all
# in every worker, and the train.py processes tests start inherit it). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prepare.synthetic import main as make_synthetic  # noqa: E402
from prepare.tiny_model import FAMILIES, write_tiny_model  # noqa: E402


def built_once(tmp_path_factory, name, build):
    """The folder `name`, made by build(path) the first time any worker of this run asks for it.
    xdist workers each have their own base temp folder; their parent is the run's, shared."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = os.path.join(str(root), name)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.isdir(path):
            build(path + ".tmp")  # renamed once whole: an interrupted build is never taken for one
            os.replace(path + ".tmp", path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return built_once(tmp_path_factory, "tiny-qwen2.5-vl", lambda path: write_tiny_model(path, seed=0))


@pytest.fixture(scope="session")
def tiny_family_model_dir(tmp_path_factory, tiny_model_dir):
    """family name (prepare/tiny_model.py FAMILIES) -> a tiny random checkpoint of that Qwen-VL family;
    qwen2_5_vl is `tiny_model_dir` itself."""
    def get(family):
        if family == "qwen2_5_vl":
            return tiny_model_dir
        return built_once(tmp_path_factory, f"tiny-{family}", lambda path: write_tiny_model(path, seed=0, family=family))
    return get


@pytest.fixture(scope="session", params=list(FAMILIES))  # every Qwen-VL family, by model_type
def family_model_dir(request, tiny_family_model_dir):
    """A tiny random checkpoint of each family in turn (tests that take it run once per family)."""
    return tiny_family_model_dir(request.param)


def write_synthetic(path):
    make_synthetic(["--out", path, "--train", "24", "--val", "12", "--size", "64", "--frames", "8",
                    "--fps", "8", "--workers", "1"])


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return built_once(tmp_path_factory, "synthetic", write_synthetic)


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
