"""Nothing lost: exact resume, exact gradient accumulation, stop signals, kills at any moment."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import loaders
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"]) for m in map(json.loads, f) if m["split"] == "train"]


def final_weights(output_dir):
    ckpt = sorted(os.listdir(os.path.join(output_dir, "checkpoints")))[-1]
    folder = os.path.join(output_dir, "checkpoints", ckpt)
    weights = load_file(os.path.join(folder, "trainable.safetensors"))
    weights.update({f"head.{k}": v for k, v in
                    load_file(os.path.join(folder, "heads", "default", "action_decoder.safetensors")).items()})
    return ckpt, weights


def send_sigterm_at_step(output_dir, step):
    """Watches metrics.jsonl and sends SIGTERM to this process once `step` has been logged."""
    def watch():
        path = os.path.join(output_dir, "metrics.jsonl")
        for _ in range(3000):
            if os.path.exists(path) and any(m.get("step", 0) >= step for m in map(json.loads, open(path))):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_stop_and_resume_equals_uninterrupted_run(base_args, tmp_path):
    # dropout on (the RNG must resume), random frame offsets (training sampling), an epoch boundary
    # crossed after the resume (24 clips / 4 = 6 steps an epoch), a worker process.
    common = base_args + ["--max_steps", "8", "--lora_dropout", "0.1", "--dataloader_num_workers", "1",
                          "--eval_datasets", "[]", "--save_steps", "0"]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train.main(common + ["--output_dir", straight])

    watcher = send_sigterm_at_step(interrupted, 3)
    train.main(common + ["--output_dir", interrupted])  # SIGTERM: finish the step, save, return
    watcher.join()
    stopped_at = train_losses(interrupted)[-1][0]
    assert 3 <= stopped_at < 8, "the run should have stopped early"
    assert os.listdir(os.path.join(interrupted, "checkpoints")) == [f"step_{stopped_at:07d}"]
    train.main(common + ["--output_dir", interrupted, "--resume", "auto"])

    assert train_losses(interrupted) == train_losses(straight)  # bit-exact, every step
    ckpt_a, a = final_weights(straight)
    ckpt_b, b = final_weights(interrupted)
    assert ckpt_a == ckpt_b == "step_0000008" and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


class WorkerPids(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        time.sleep(0.01)
        return os.getpid()


def first_item(items):
    return items[0]


def test_dataloader_workers_survive_sigint():
    batches = [[i] for i in range(40)]
    loader = loaders.make_loader(WorkerPids(), batches, first_item, num_workers=1, seed=0)
    it = iter(loader)
    worker = next(it)
    assert worker != os.getpid()
    os.kill(worker, signal.SIGINT)  # without loaders.ignore_ctrl_c the worker exits and the loader raises
    assert list(it) == [worker] * 39


def test_a_relayed_ctrl_c_stops_once_and_a_later_one_quits():
    stop = train.StopSignal(0)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun relays the keypress its ranks already got
        assert (stop.requested, stop.name) == (1, "SIGINT")
        stop.since -= 3  # the user presses Ctrl-C again, seconds later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_ctrl_c_in_a_terminal_saves_and_the_run_resumes(base_args, tmp_path, capsys):
    """A terminal's Ctrl-C signals the whole process group: the trainer and its DataLoader workers.
    The workers must live on, the trainer must save at once (no evaluation first) and exit 0."""
    out = str(tmp_path / "run")
    args = base_args + ["--output_dir", out, "--max_steps", "12", "--dataloader_num_workers", "1",
                        "--eval_steps", "0", "--resume", "auto"]  # an eval set: evaluated at the end only
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while logged_steps(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGINT" in output and "exited unexpectedly" not in output, output[-3000:]
    stopped_at = train_losses(out)[-1][0]
    assert 3 <= stopped_at < 12
    assert os.listdir(os.path.join(out, "checkpoints")) == [f"step_{stopped_at:07d}"]
    assert not [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if m["split"] == "val"]

    train.main(args)  # the same command again (in this process: what it does is the same)
    assert "resumed from" in capsys.readouterr().out
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if m["split"] == "train"] == list(range(1, 13))
    assert [m["step"] for m in metrics if m["split"] == "val"] == [12]


class StopAlreadyRequested(train.StopSignal):
    """As if SIGTERM had arrived during the first step."""

    def __init__(self, rank):
        super().__init__(rank)
        self.requested, self.name, self.since = 1, "SIGTERM", time.monotonic()


def test_a_stop_during_the_last_step_still_evaluates(base_args, tmp_path, monkeypatch):
    """A stop skips evaluation to save sooner, but not at the last step: no resume would run it."""
    monkeypatch.setattr(train, "StopSignal", StopAlreadyRequested)
    out = str(tmp_path / "run")
    train.main(base_args + ["--output_dir", out, "--max_steps", "1"])
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if m["split"] == "val"] == [1]
    assert "step_0000001" in os.listdir(os.path.join(out, "checkpoints"))


def test_resume_auto_passes_over_an_unreadable_newest_checkpoint(base_args, tmp_path, capsys):
    common = base_args + ["--max_steps", "3", "--eval_datasets", "[]", "--save_steps", "1", "--save_total_limit", "3"]
    straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
    train.main(common + ["--output_dir", straight])
    train.main(common + ["--output_dir", damaged, "--max_steps", "2"])
    newest = os.path.join(damaged, "checkpoints", "step_0000002", "trainable.safetensors")
    with open(newest, "r+b") as f:  # a disk fault after the rename: the file is cut short
        f.truncate(os.path.getsize(newest) // 2)
    capsys.readouterr()
    train.main(common + ["--output_dir", damaged, "--resume", "auto"])
    out = capsys.readouterr().out
    assert "step_0000002 cannot be read (SafetensorError" in out and "resumed from" in out and "at step 1" in out
    assert train_losses(damaged) == train_losses(straight)  # steps 2 and 3 again, exactly

    for step in (1, 2, 3):  # now no checkpoint can be read: say so for each, start nothing
        os.remove(os.path.join(damaged, "checkpoints", f"step_{step:07d}", "optimizer.pt"))
    with pytest.raises(SystemExit) as err:
        train.main(common + ["--output_dir", damaged, "--resume", "auto"])
    message = str(err.value)
    assert "no checkpoint" in message and all(f"step_{s:07d}: optimizer.pt is missing" in message for s in (1, 2, 3))


@pytest.mark.parametrize("batch,accumulation", [(2, 2), (1, 4)])
def test_gradient_accumulation_equals_one_big_batch(base_args, tmp_path, batch, accumulation):
    common = base_args + ["--max_steps", "3", "--eval_datasets", "[]", "--lr_scheduler_type", "constant",
                          "--warmup_steps", "0"]
    big, accumulated = str(tmp_path / "big"), str(tmp_path / "acc")
    train.main(common + ["--output_dir", big, "--per_device_train_batch_size", "4"])
    train.main(common + ["--output_dir", accumulated, "--per_device_train_batch_size", str(batch),
                         "--gradient_accumulation_steps", str(accumulation)])
    assert_same_training(big, accumulated)


def assert_same_training(a_dir, b_dir):
    (steps_a, losses_a), (steps_b, losses_b) = zip(*train_losses(a_dir)), zip(*train_losses(b_dir))
    assert steps_a == steps_b
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), rtol=1e-5, atol=1e-6)
    _, a = final_weights(a_dir)
    _, b = final_weights(b_dir)
    for name in a:  # same update up to float summation order
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)  # lr is 1e-3


def torchrun(args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(random.randint(20000, 40000)), os.path.join(ROOT, "train.py")] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def checkpoint_is_complete(folder):
    """Everything a resume reads, read the way a resume reads it."""
    load_file(os.path.join(folder, "trainable.safetensors"))
    load_file(os.path.join(folder, "heads", "default", "action_decoder.safetensors"))
    torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
    torch.load(os.path.join(folder, "rng_rank0.pt"), weights_only=True)
    return json.load(open(os.path.join(folder, "trainer_state.json")))["step"]


def logged_steps(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_kill_at_random_moments_never_corrupts_the_last_checkpoint(base_args, tmp_path, capsys):
    """kill -9 at random moments of a run that saves every step (so many kills land mid-save);
    after each, the newest complete checkpoint must load, and the next run resumes from it; the
    finished run trains exactly as an uninterrupted one. (bench/kill_sweep.py: every phase, workers.)"""
    out = str(tmp_path / "run")
    args = base_args + ["--output_dir", out, "--max_steps", "20", "--save_steps", "1", "--save_total_limit", "2",
                        "--eval_datasets", "[]", "--resume", "auto"]
    train.main(args + ["--output_dir", str(tmp_path / "uninterrupted"), "--resume", "null"])
    rng = random.Random(0)
    resumed_steps = []
    for kill in range(3):
        before = logged_steps(out)
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while logged_steps(out) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # wait until this run is training, then kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.4))  # a step + its save take ~50-100 ms here
        assert proc.poll() is None, "the run ended before it was killed"
        proc.kill()
        output = proc.communicate()[0]
        if "resumed from" in output:
            resumed_steps.append(int(output.split("at step ")[1].split()[0]))
        found = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
        if found:
            assert checkpoint_is_complete(os.path.join(out, "checkpoints", found[-1])) == int(found[-1][5:])
    assert len(resumed_steps) >= 2 and resumed_steps == sorted(resumed_steps), "each resume starts where the last left off"
    train.main(args)  # the run that finishes: the same command (in this process)
    assert f"resumed from {out}/checkpoints/step_" in capsys.readouterr().out
    steps = [s for s, _ in train_losses(out)]
    assert steps == list(range(1, 21)), "metrics.jsonl reads as one uninterrupted run"
    reference = dict(train_losses(str(tmp_path / "uninterrupted")))
    assert max(abs(loss - reference[step]) for step, loss in train_losses(out)) <= 1e-6
