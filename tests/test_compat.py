"""What `main` wrote before the refactor into checkpoint.py / llamafactory.py / distributed.py still
loads: a checkpoint and an export made by actcls at 50c88ad (tests/data/main-50c88ad, see its
README.md) give the probabilities that version printed for the same clips, and the checkpoint resumes."""

import json
import os
import shutil

import pytest
import torch
import yaml

import checkpoint
import export
from config import head_sizes, saved_config
from inference import VideoClassifier
from model import build_classifier, build_optimizer

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "main-50c88ad")
TOL = 1e-5


def expected(kind):
    with open(os.path.join(FIXTURE, "predictions.json")) as f:
        return json.load(f)[kind]


def clips():
    return [os.path.join(FIXTURE, "clips", name) for name, _ in expected("checkpoint")]


@pytest.fixture(scope="module")
def old_checkpoint(tiny_model_dir, tmp_path_factory):
    """The old checkpoint, its config pointed at this session's tiny model (the same bytes: seed 0)."""
    folder = str(tmp_path_factory.mktemp("old") / "step_0000002")
    shutil.copytree(os.path.join(FIXTURE, "checkpoint"), folder)
    path = os.path.join(folder, "config.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["model_name_or_path"] = tiny_model_dir
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return folder


def assert_same_predictions(clf, kind):
    got = clf.predict(clips(), top_k=6)
    for (name, top), result in zip(expected(kind), got):
        assert os.path.basename(result["video"]) == name
        assert [c for c, _ in result["top"]] == [c for c, _ in top]
        assert max(abs(p - q) for (_, p), (_, q) in zip(result["top"], top)) < TOL


def test_old_checkpoint_predicts_as_it_did(old_checkpoint):
    assert checkpoint.folder_kind(old_checkpoint) == "checkpoint"
    assert checkpoint.checkpoint_problem(old_checkpoint) is None
    assert_same_predictions(VideoClassifier.from_pretrained(old_checkpoint, device="cpu"), "checkpoint")


def test_old_checkpoint_resumes(old_checkpoint):
    """Its trainer state, weights, Adam moments and RNG load into a fresh model and optimizer."""
    cfg = saved_config(os.path.join(old_checkpoint, "config.yaml"))
    _, model = build_classifier(cfg, head_sizes(cfg))
    state = checkpoint.load_checkpoint(old_checkpoint, model, cfg)
    assert state["step"] == 2 and "base_model" not in state
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.load_training_state(old_checkpoint, model, optimizer, scheduler, state["step"], rank=0)
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert moments and all(m.abs().sum() > 0 for m in moments)  # the moments came from the file, not zeros
    assert scheduler.last_epoch == 2


def test_old_export_predicts_as_it_did(old_checkpoint, tmp_path):
    """The export's own files (actcls.json, heads/, the model card) as the old version wrote them,
    beside the Hugging Face files of the same checkpoint (transformers' format, not ours)."""
    folder = str(tmp_path / "export")
    export.export(old_checkpoint, folder, "bf16")
    with open(os.path.join(folder, "actcls.json")) as f, open(os.path.join(FIXTURE, "export", "actcls.json")) as g:
        new, old = json.load(f), json.load(g)
    assert {k: v for k, v in new.items() if k != "source"} == {k: v for k, v in old.items() if k != "source"}
    for name in ("actcls.json", "README.md"):
        os.remove(os.path.join(folder, name))
    shutil.rmtree(os.path.join(folder, "heads"))
    shutil.copytree(os.path.join(FIXTURE, "export"), folder, dirs_exist_ok=True)
    assert checkpoint.folder_kind(folder) == "export"
    assert_same_predictions(VideoClassifier.from_pretrained(folder, device="cpu"), "export")
