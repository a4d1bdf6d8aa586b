"""FSDP2 (`--fsdp true`): the same training as DDP, checkpoints a plain model loads, exact resume,
and evaluation on an eval set of any size.

Two CPU processes under torchrun (gloo), the tiny model, 1 clip x 2 micro-steps per rank (so the
FSDP2 gradient-sync switch is exercised) and a clip norm small enough to bind (so the DTensor
clip_grad_norm_ is). Checkpoints at steps 2 and 4. The eval set has 7 clips at 3 a batch: rank 0
gets 4 (2 batches a view), rank 1 gets 3 (1 batch), so FSDP2's rank 1 runs padding batches."""

import json
import os
import shutil

import pytest
import torch

from inference import VideoClassifier
from data import Collator, VideoDataset, load_samples
from model import build_classifier
import train
from test_resume import ROOT, assert_same_training, torchrun, train_losses
from config import head_sizes, saved_config
from video import VideoSettings


@pytest.fixture(scope="module")
def runs(tiny_model_dir, synthetic_dir, tmp_path_factory):
    """The same 4-step run with DDP and with FSDP2: (common args, {"ddp": dir, "fsdp": dir})."""
    root = tmp_path_factory.mktemp("fsdp")
    with open(os.path.join(synthetic_dir, "val.jsonl")) as f, open(root / "val7.jsonl", "w") as out:
        out.writelines(line.replace('"videos": ["', f'"videos": ["{synthetic_dir}/') for line in f.readlines()[:7])
    args = ["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", tiny_model_dir,
            "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]",
            "--eval_datasets", f"[{{path: {root}/val7.jsonl, name: val7}}]", "--per_device_eval_batch_size", "3",
            "--eval_num_clips", "2", "--eval_num_crops", "3",
            "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--dataloader_num_workers", "0",
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_steps", "4",
            "--warmup_steps", "1", "--max_grad_norm", "0.1", "--logging_steps", "1", "--save_steps", "2"]
    dirs = {"ddp": str(root / "ddp"), "fsdp": str(root / "fsdp")}
    for mode, out in dirs.items():
        result = torchrun(args + ["--output_dir", out, "--fsdp", str(mode == "fsdp").lower()])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return args, dirs


def val_lines(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m["split"] == "val"]


def assert_same_evaluation(a, b):
    """The same samples counted once each, and the same metrics up to float summation order."""
    assert [(m["step"], m["count"]) for m in a] == [(m["step"], m["count"]) for m in b]
    for x, y in zip(a, b):
        assert (x["top1"], x["top5"]) == (y["top1"], y["top5"])
        assert abs(x["loss"] - y["loss"]) < 1e-5


def test_fsdp_evaluates_an_uneven_eval_set_like_ddp(runs):
    """7 clips x 2x3 views on 2 ranks at 3 a batch: 4 vs 2 batches a view before padding. Every clip
    counts once (count 7), with DDP's metrics."""
    _, dirs = runs
    fsdp, ddp = val_lines(dirs["fsdp"]), val_lines(dirs["ddp"])
    assert [(m["step"], m["dataset"], m["count"]) for m in fsdp] == [(4, "val7", 7)]
    assert_same_evaluation(fsdp, ddp)


def test_fsdp_trains_like_ddp(runs):
    _, dirs = runs
    assert [s for s, _ in train_losses(dirs["fsdp"])] == [1, 2, 3, 4]
    assert_same_training(dirs["ddp"], dirs["fsdp"])  # losses rtol 1e-5, final weights rtol 1e-4 / atol 1e-5
    # Adam's state: whole tensors keyed by parameter name, whichever way it was trained.
    a, b = (torch.load(os.path.join(d, "checkpoints", "step_0000004", "optimizer.pt"), weights_only=True)
            for d in (dirs["ddp"], dirs["fsdp"]))
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["state"][name][key], b["state"][name][key], rtol=1e-4, atol=1e-7)
        assert a["state"][name]["step"] == b["state"][name]["step"] == 4


def test_fsdp_checkpoint_loads_into_a_plain_model(runs, synthetic_dir):
    _, dirs = runs
    logits = {}
    for mode, out in dirs.items():  # predict.py's loader: a fresh, unsharded model + load_weights
        clf = VideoClassifier.from_pretrained(os.path.join(out, "checkpoints", "step_0000004"), "cpu")
        processor, model = clf.processor, clf.model
        cfg = saved_config(os.path.join(out, "checkpoints", "step_0000004", "config.yaml"))
        assert cfg.fsdp == (mode == "fsdp")
        samples, _ = load_samples(os.path.join(synthetic_dir, "val.jsonl"), None, 6)
        settings = VideoSettings(cfg.video_fps, cfg.video_maxlen, cfg.video_num_frames, cfg.video_min_pixels,
                                 cfg.video_max_pixels)
        dataset = VideoDataset(samples, settings)
        batch = Collator(processor, model.act_token_id)([dataset[(i, 0, False)] for i in range(4)])
        with torch.no_grad():
            logits[mode] = model("default", **batch.inputs)
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], rtol=1e-4, atol=1e-5)
    _, untrained = build_classifier(cfg, head_sizes(cfg))  # the comparison is not vacuous: loading matters
    with torch.no_grad():
        assert not torch.allclose(untrained.eval()("default", **batch.inputs), logits["fsdp"], atol=1e-3)


def test_ddp_two_ranks_with_accumulation_equals_one_process(runs, tmp_path):
    """2 ranks x 1 clip x 2 micro-steps (no_sync on the first) == 1 process x 4 clips."""
    args, dirs = runs
    single = str(tmp_path / "single")
    train.main(args + ["--output_dir", single, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"])
    assert_same_training(single, dirs["ddp"])


def test_gradient_checkpointing_under_ddp_matches_no_checkpointing(runs, tmp_path):
    """The same 2-rank DDP run (no_sync on the first micro-step) with gradient checkpointing: the
    losses and the weights of the run without it. (Dropout masks replayed by the recompute:
    test_memory.test_gradient_checkpointing_gives_the_same_gradients.)"""
    args, dirs = runs
    out = str(tmp_path / "gc")
    result = torchrun(args + ["--output_dir", out, "--fsdp", "false", "--gradient_checkpointing", "true"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert_same_training(dirs["ddp"], out)


def resumed_from_step_2(dirs, tmp_path):
    out = str(tmp_path / "resumed")
    shutil.copytree(dirs["fsdp"], out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step_0000004"))
    return out


def test_resume_from_an_fsdp_checkpoint_continues_the_run_sharded(runs, tmp_path):
    """Stopped after step 2 (its step 4 removed), resumed sharded: steps 3-4 as in one go."""
    args, dirs = runs
    out = resumed_from_step_2(dirs, tmp_path)
    one_view = ["--eval_num_clips", "1", "--eval_num_crops", "1"]
    result = torchrun(args + ["--output_dir", out, "--fsdp", "true", "--resume", "auto"] + one_view)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "at step 2" in result.stdout
    assert_same_training(dirs["fsdp"], out)
    # Its final evaluation, one view a clip (rank 0: 2 batches, rank 1: 1 + 1 padding), against the
    # same weights evaluated by one unsharded process (--eval_only).
    reference = str(tmp_path / "eval")
    train.main(args + one_view + ["--output_dir", reference, "--eval_only", "true",
                                  "--checkpoint", os.path.join(out, "checkpoints", "step_0000004")])
    with open(os.path.join(reference, "eval.json")) as f:
        expected = json.load(f)["datasets"]["val7"]
    assert_same_evaluation(val_lines(out), [{"step": 4, **expected}])


def test_resume_from_an_fsdp_checkpoint_continues_the_run_in_one_plain_process(runs, tmp_path, capsys):
    """The same checkpoint resumed unsharded by one process of 2 clips x 2 micro-steps (the same 4
    clips a step as 2 ranks x 1 x 2): steps 3-4 as in one go."""
    args, dirs = runs
    out = resumed_from_step_2(dirs, tmp_path)
    train.main(args + ["--output_dir", out, "--fsdp", "false", "--resume", "auto", "--per_device_train_batch_size", "2"])
    assert "at step 2" in capsys.readouterr().out
    assert_same_training(dirs["fsdp"], out)
