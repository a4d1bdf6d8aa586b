"""The LLaMA-Factory training keys actcls builds (issue 13, part B): report_to / run_name (wandb,
TensorBoard, none), ddp_timeout, max_samples, val_size, metric_for_best_model, use_rslora,
save_only_model, the polynomial schedule, gradient_checkpointing."""

import glob
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import types

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import get_polynomial_decay_schedule_with_warmup

import train
from config import Config, ConfigError
from llamafactory import parse_config
from data import hold_out
from inference import VideoClassifier
from checkpoint import checkpoint_problem
from model import build_classifier, load_processor, vision_geometry
from test_resume import ROOT, assert_same_training, train_losses


def val_lines(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m["split"] == "val"]


def config_error(argv):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------
# Datasets: max_samples, val_size

@pytest.fixture
def geometry(tiny_model_dir):
    return vision_geometry(load_processor(tiny_model_dir)[0])


def test_max_samples_reads_the_first_records_of_each_training_set(synthetic_dir, geometry):
    cfg = Config(train_datasets=[{"path": f"{synthetic_dir}/train.jsonl"}],
                 eval_datasets=[{"path": f"{synthetic_dir}/val.jsonl"}], max_samples=10)
    mix = train.load_mix(cfg, cfg.train_datasets, geometry)
    assert [s.source for s in mix.dataset.samples] == [f"{synthetic_dir}/train.jsonl:{i}" for i in range(1, 11)]
    assert len(train.load_mix(cfg, cfg.eval_datasets, geometry).dataset) == 12  # eval sets are not capped
    assert "max_samples: must be > 0" in config_error(["--train_datasets", "[{path: x}]", "--max_samples", "0"])


def test_val_size_is_a_seeded_split_by_fraction_or_count(synthetic_dir, geometry):
    cfg = Config(train_datasets=[{"path": f"{synthetic_dir}/train.jsonl"}])
    mix = train.load_mix(cfg, cfg.train_datasets, geometry)
    everything = {s.source for s in mix.dataset.samples}

    def split(val_size, seed):
        kept, held = hold_out(mix, val_size, seed)
        return {s.source for s in kept.dataset.samples}, {s.source for s in held.dataset.samples}, held

    kept, held, held_mix = split(0.25, seed=0)
    assert len(held) == 6 and len(kept) == 18 and kept | held == everything and not kept & held
    assert held_mix.counts == [6] and held_mix.names == [f"{mix.names[0]}_heldout"]
    assert split(0.25, seed=0)[1] == held  # the same split on every rank and every resume
    assert split(0.25, seed=1)[1] != held
    assert len(split(5, seed=0)[1]) == 5  # an int is a count
    assert len(split(0.1, seed=0)[1]) == 3  # ceil(0.1 x 24), as datasets' train_test_split
    with pytest.raises(ConfigError, match="both need at least one"):
        hold_out(mix, 24, 0)
    assert "use one of them" in config_error(["--train_datasets", "[{path: x}]", "--eval_datasets", "[{path: y}]",
                                              "--val_size", "0.1"])
    assert "neither a fraction" in config_error(["--train_datasets", "[{path: x}]", "--val_size", "2.0"])


def test_val_size_records_are_evaluated_and_never_trained_on(base_args, synthetic_dir, geometry, tmp_path,
                                                             monkeypatch):
    """24 clips, 6 held out, 18 train: 6 steps of 4 cross an epoch, so a split that leaked would
    put held-out clips into batches."""
    trained = []
    micro_step = train.train_micro_step

    def spy(run, batch):
        trained.extend(batch.sources)
        return micro_step(run, batch)
    monkeypatch.setattr(train, "train_micro_step", spy)
    out = str(tmp_path / "run")
    train.main(base_args + ["--eval_datasets", "[]", "--val_size", "0.25", "--max_steps", "6", "--output_dir", out])
    cfg = Config(train_datasets=[{"path": f"{synthetic_dir}/train.jsonl"}], seed=0)  # synthetic.yaml's seed
    _, held = hold_out(train.load_mix(cfg, cfg.train_datasets, geometry), 0.25, seed=0)
    held_sources = {s.source for s in held.dataset.samples}
    assert len(trained) == 24 and len(set(trained)) >= 16
    assert not held_sources & set(trained)
    (val,) = val_lines(out)
    assert val["count"] == 6 and val["dataset"].endswith("_heldout")


# ---------------------------------------------------------------------------------------------------
# Checkpoints: metric_for_best_model, save_only_model

def test_metric_for_best_model_decides_which_evaluation_is_best(monkeypatch):
    evaluations = iter([{"a": {"loss": 1.0, "top1": 0.5}}, {"a": {"loss": 0.8, "top1": 0.4}},
                        {"a": {"loss": 0.9, "top1": 0.6}}] * 3)
    monkeypatch.setattr(train, "evaluate", lambda *args: (next(evaluations), None, []))
    monkeypatch.setattr(train, "log_evaluation", lambda *args: None)
    picks = {}
    for name in ("eval_loss", "eval_top1", "accuracy"):
        run = types.SimpleNamespace(cfg=Config(metric_for_best_model=name), state={"best_metric": None},
                                    wrapped=None, evals=None, eval_mix=None, device=None)
        picks[name] = [train.evaluate_and_track_best(run) for _ in range(3)]
    assert picks == {"eval_loss": [True, True, False], "eval_top1": [True, False, True],
                     "accuracy": [True, False, True]}
    assert "not an eval metric here" in config_error(["--train_datasets", "[{path: x}]",
                                                      "--metric_for_best_model", "eval_bleu"])


def test_metric_for_best_model_eval_loss_points_best_at_the_lowest_loss(base_args, tmp_path):
    out = str(tmp_path / "run")
    train.main(base_args + ["--max_steps", "3", "--eval_steps", "1", "--save_total_limit", "0",
                            "--metric_for_best_model", "eval_loss", "--output_dir", out])
    lowest = min(val_lines(out), key=lambda m: m["loss"])["step"]
    assert os.path.basename(os.path.realpath(os.path.join(out, "checkpoints", "best"))) == f"step_{lowest:07d}"
    with open(os.path.join(out, "checkpoints", "best", "trainer_state.json")) as f:
        assert json.load(f)["best_metric_name"] == "loss"


def test_save_only_model_writes_weights_only_and_a_resume_refuses(base_args, synthetic_dir, tmp_path):
    out = str(tmp_path / "run")
    common = base_args + ["--eval_datasets", "[]", "--save_only_model", "true", "--output_dir", out]
    train.main(common + ["--max_steps", "2"])
    folder = os.path.join(out, "checkpoints", "step_0000002")
    assert sorted(os.listdir(folder)) == ["classes.json", "config.yaml", "heads", "trainable.safetensors",
                                          "trainer_state.json"]  # no optimizer.pt, no rng_rank*.pt
    assert checkpoint_problem(folder) is None  # complete as what it is: --resume auto must not pass it over
    with pytest.raises(SystemExit, match="saved with save_only_model: true.*cannot resume from it"):
        train.main(common + ["--max_steps", "4", "--resume", "auto"])
    # its weights still serve prediction
    clf = VideoClassifier.from_pretrained(folder)
    video = sorted(glob.glob(os.path.join(synthetic_dir, "videos", "*")))[0]
    assert len(clf.predict([video], top_k=3)[0]["top"]) == 3


# ---------------------------------------------------------------------------------------------------
# Model and schedule: use_rslora, polynomial, gradient_checkpointing

def test_use_rslora_scales_adapters_by_alpha_over_sqrt_rank(tiny_model_dir):
    scales = {}
    for rslora in (False, True):
        cfg = Config(model_name_or_path=tiny_model_dir, train_datasets=[{"path": "x"}], lora_rank=16,
                     lora_alpha=32, use_rslora=rslora)
        _, model = build_classifier(cfg, {"default": 6})
        scales[rslora] = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scales == {False: {32 / 16}, True: {32 / 16 ** 0.5}}


def test_polynomial_schedule_matches_hugging_face():
    cfg = parse_config(["--train_datasets", "[{path: x}]", "--learning_rate", "1e-3", "--warmup_steps", "3",
                        "--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs", "{power: 2, lr_end: 1e-5}"])
    assert cfg.lr_scheduler_kwargs == {"power": 2, "lr_end": 1e-5}  # the YAML string 1e-5 read as a float
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    theirs = get_polynomial_decay_schedule_with_warmup(optimizer, 3, 20, lr_end=1e-5, power=2)
    ours = train.lr_lambda(cfg, 20)
    for step in range(25):
        if step >= 3:  # the warm-up is actcls's own ((step + 1) / warmup, the first step not at lr 0)
            assert ours(step) * 1e-3 == pytest.approx(theirs.lr_lambdas[0](step) * 1e-3, rel=1e-9, abs=1e-12), step
    assert ours(20) * 1e-3 == pytest.approx(1e-5) and ours(11) < ours(10)
    assert "only polynomial takes" in config_error(["--train_datasets", "[{path: x}]",
                                                    "--lr_scheduler_kwargs", "{power: 2}"])
    assert "must be below learning_rate" in config_error(
        ["--train_datasets", "[{path: x}]", "--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs",
         "{lr_end: 0.1}"])


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(base_args, tmp_path, monkeypatch):
    """With it on, a decoder layer's MLP runs twice per micro-step (forward, then again in backward);
    the losses and weights equal a run without it. It only acts in train mode, which
    from_pretrained does not leave the model in: train.py has to set it."""
    calls = []
    build = train.build_classifier

    def counted(*args):
        processor, model = build(*args)
        # a pre-hook: torch's checkpoint stops a recompute as soon as the saved tensors are back, before
        # the MLP returns, so a forward hook would not fire the second time
        model.backbone.language_model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        return processor, model
    monkeypatch.setattr(train, "build_classifier", counted)
    common = base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--lr_scheduler_type", "constant"]
    runs = {}
    for on in (False, True):
        calls.clear()
        runs[on] = str(tmp_path / f"gc_{on}")
        train.main(common + ["--gradient_checkpointing", str(on).lower(), "--output_dir", runs[on]])
        assert len(calls) == (4 if on else 2), on
    assert_same_training(runs[False], runs[True])


# ---------------------------------------------------------------------------------------------------
# Logging: report_to, run_name, wandb

def test_report_to_none_writes_metrics_but_no_tensorboard_events(base_args, tmp_path):
    for report, events in (("none", 0), ("tensorboard", 1)):
        out = str(tmp_path / report)
        train.main(base_args + ["--max_steps", "1", "--eval_datasets", "[]", "--report_to", report,
                                "--output_dir", out])
        assert len(train_losses(out)) == 1
        assert len(glob.glob(os.path.join(out, "events.out.tfevents.*"))) == events, report
    assert "not among" in config_error(["--train_datasets", "[{path: x}]", "--report_to", "mlflow"])


def test_report_to_wandb_without_wandb_says_pip_install(base_args, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = base_args + ["--max_steps", "1", "--eval_datasets", "[]", "--report_to", "wandb"]
    with pytest.raises(SystemExit, match="pip install wandb"):
        train.main(args + ["--output_dir", str(tmp_path / "a")])
    assert not os.path.exists(os.path.join(tmp_path, "a", "metrics.jsonl"))  # before any step
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb off: no package needed, nothing written for it
    train.main(args + ["--output_dir", str(tmp_path / "b")])
    assert len(train_losses(str(tmp_path / "b"))) == 1 and not os.path.exists(tmp_path / "b" / "wandb")


def wandb_records(run_dir):
    """An offline run's transaction log (run-*.wandb), read by wandb's own CLI: its history rows by
    step, and the summary (config, name, state)."""
    inspect = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]
    lines = subprocess.run(inspect + [run_dir], capture_output=True, text=True, timeout=120, check=True).stdout
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in map(json.loads, lines.splitlines())
               if r["type"] == "history"}
    summary = subprocess.run(inspect + ["--summary", run_dir], capture_output=True, text=True, timeout=120,
                             check=True).stdout
    return history, json.loads(summary)


def test_wandb_offline_run_holds_the_config_and_the_scalars(base_args, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # optional: not in requirements.txt
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    train.main(base_args + ["--max_steps", "2", "--report_to", "wandb", "--run_name", "rslora-try",
                            "--learning_rate", "2e-3", "--use_rslora", "true", "--output_dir", out])
    (run_dir,) = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    assert not glob.glob(os.path.join(out, "events.out.tfevents.*"))  # report_to: wandb alone
    history, run = wandb_records(run_dir)
    assert run["name"] == "rslora-try" and run["state"] == "finished" and run["project"] == "actcls"
    assert run["config"]["learning_rate"] == 2e-3 and run["config"]["use_rslora"] is True  # the resolved config
    logged = [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]
    for m in logged:  # every scalar metrics.jsonl (and TensorBoard) gets, at its step
        for key, value in m.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                tag = f"{m['split']}/{m['dataset']}/{key}" if "dataset" in m else f"{m['split']}/{key}"
                assert history[m["step"]][tag] == pytest.approx(value), (m["step"], key)
    assert sorted(history) == [1, 2] and any(tag.endswith("/top1") and tag.startswith("val/") for tag in history[2])


# ---------------------------------------------------------------------------------------------------
# ddp_timeout

def test_ddp_timeout_bounds_the_wait_for_missing_ranks(base_args, tmp_path):
    """A launcher whose peer never comes (WORLD_SIZE 2, one process): the rendezvous gives up after
    ddp_timeout seconds with a message naming it, instead of PyTorch's 30 minutes."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "lonely", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(random.randint(20000, 40000))}
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + base_args +
                            ["--ddp_timeout", "3", "--output_dir", str(tmp_path / "run")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - start < 90
    assert "did not join within ddp_timeout=3s" in result.stderr and "Traceback" not in result.stderr
