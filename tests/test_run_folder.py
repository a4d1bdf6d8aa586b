"""A run's folder belongs to that run (run_folder.py): a live run's folder refuses a second run, a
killed run's never blocks --resume auto, a finished run's is never overwritten by a fresh run
unless overwrite_output_dir says so; a resume says what changed; a full disk loses nothing."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings

import pytest

import predict
import run_folder
import train
import video
from batch_plan import StepLayout, resumed_position
from test_resume import ROOT, assert_same_training, train_losses


def listing(folder):
    """Every file under `folder` with its bytes (a fingerprint of what a run left), but the lock,
    which each launch rewrites with its own pid."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in set(files) - {run_folder.LOCK_FILE}:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.fixture(scope="module")
def finished(tiny_model_dir, synthetic_dir, tmp_path_factory):
    """A finished 4-step run, checkpoints at 2 and 4: (its args without --output_dir, its folder)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    args = ["--config", os.path.join(ROOT, "configs", "synthetic.yaml"), "--model_name_or_path", tiny_model_dir,
            "--train_datasets", f"[{{path: {synthetic_dir}/train.jsonl}}]", "--eval_datasets", "[]",
            "--video_min_pixels", "3136", "--video_max_pixels", "3136", "--dataloader_num_workers", "0",
            "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "1"]
    train.main(args + ["--output_dir", out])
    return args, out


def stopped_at_step_2(done, out):
    """A copy of the finished run as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(done, out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step_0000004"))
    return out


def resume_lines(args, out, capsys, *changes):
    """The `resume:` start-up lines of `--resume auto` in `out` with `changes` on the command line."""
    capsys.readouterr()
    train.main(args + ["--output_dir", out, "--resume", "auto", *changes])
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]


def test_a_live_runs_folder_refuses_a_second_run_and_an_evaluation(finished, synthetic_dir, tmp_path):
    args, done = finished
    out = str(tmp_path / "live")
    os.makedirs(out)
    holder = run_folder.take_lock(out)  # flock is per open file: this process's own train.main is refused too
    try:
        evaluation = ["--eval_only", "true", "--checkpoint", f"{done}/checkpoints/step_0000004",
                      "--eval_datasets", f"[{{path: {synthetic_dir}/val.jsonl}}]"]
        for extra in ([], evaluation):
            with pytest.raises(SystemExit) as stop:
                train.main(args + ["--output_dir", out] + extra)
            assert str(stop.value) == (f"output_dir {out} belongs to a live run: pid {os.getpid()} on "
                                       f"{socket.gethostname()}, started {json.load(open(holder.name))['started']}. "
                                       f"Wait for it to end or stop it, or pick another output_dir.")
        assert sorted(os.listdir(out)) == [run_folder.LOCK_FILE]  # it wrote nothing
    finally:
        holder.close()


def test_a_run_killed_with_sigkill_never_blocks_the_resume(finished, tmp_path):
    args, done = finished
    out = stopped_at_step_2(done, str(tmp_path / "killed"))
    code = f"import run_folder, time; run_folder.take_lock({out!r}); print('locked', flush=True); time.sleep(300)"
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline() == "locked\n"
    owner.kill()  # SIGKILL: no handler runs; the kernel drops the lock
    owner.wait()
    train.main(args + ["--output_dir", out, "--resume", "auto"])
    assert_same_training(done, out)


def test_a_fresh_run_never_touches_a_finished_runs_folder(finished, tmp_path):
    """The same command again, without --resume: refused with the three ways on, the folder as it
    was. overwrite_output_dir: the earlier run is deleted first, so the folder holds one run."""
    args, done = finished
    out = str(tmp_path / "again")
    shutil.copytree(done, out)
    before = listing(out)
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--output_dir", out, "--max_steps", "2"])
    message = str(stop.value)
    assert message.startswith(f"output_dir {out} holds an earlier run (checkpoints/step_0000002, ")
    for way in ("--resume auto", "another output_dir", "--overwrite_output_dir true"):
        assert way in message
    assert listing(out) == before
    train.main(args + ["--output_dir", out, "--max_steps", "2", "--overwrite_output_dir", "true"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000002"]
    assert [step for step, _ in train_losses(out)] == [1, 2]
    assert train_losses(out) == train_losses(done)[:2]  # a fresh run, not a continuation


def test_resumed_position_keeps_the_step_for_any_split_of_the_same_step():
    saved = {"per_step": 8, "accumulation": 2}  # 2 ranks x 2 micro-batches x 2 clips, 3 steps done
    assert resumed_position(6, saved, StepLayout(2, 4, 1, 0)) == 12  # 1 rank x 4 micro-batches
    assert resumed_position(6, saved, StepLayout(8, 1, 1, 0)) == 3
    assert resumed_position(6, saved, StepLayout(2, 1, 2, 0)) == 6  # 4 samples a step: 24 used, step 6 next
    assert resumed_position(6, saved, StepLayout(5, 1, 1, 0)) == 5  # 24 samples used: step 5 starts at 25


def test_a_resume_with_another_split_of_the_step_says_so_and_stays_exact(finished, tmp_path, capsys):
    """Checkpointed at 4 clips x 1 micro-batch; resumed at 2 clips x 2 micro-batches: the same
    steps (the data position is counted in steps, not micro-batches)."""
    args, done = finished
    out = stopped_at_step_2(done, str(tmp_path / "split"))
    lines = resume_lines(args, out, capsys, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert lines == ["resume: per_device_train_batch_size changed: 4 -> 2",
                     "resume: gradient_accumulation_steps changed: 1 -> 2",
                     "resume: the same 4 samples a step, now 1 rank(s) x 2 micro-batch(es) (was 1 x 1): every step "
                     "trains on the samples it would have, from step 2 of epoch 0"]
    assert_same_training(done, out)


def test_a_resume_with_a_changed_config_lists_each_change_and_where_the_data_picks_up(finished, tmp_path, capsys):
    args, done = finished
    out = stopped_at_step_2(done, str(tmp_path / "changed"))
    lines = resume_lines(args, out, capsys, "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--seed",
                         "7", "--max_steps", "5")
    assert lines[:4] == ["resume: per_device_train_batch_size changed: 4 -> 2",
                         "resume: learning_rate changed: 0.001 -> 0.005", "resume: max_steps changed: 4 -> 5",
                         "resume: seed changed: 0 -> 7"]
    assert lines[4].startswith("resume: 4 -> 2 samples a step (") and "picks up at step 4 of epoch 0" in lines[4]
    assert lines[5].startswith("resume: seed changed: the samples or their order are not the checkpoint's")
    assert lines[6] == "resume: the run now has 5 steps (was 4): the learning-rate schedule spans 5 steps and goes on from step 2"
    assert [step for step, _ in train_losses(out)] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------
# A full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: one checkpoint of the tiny model (2.1 MB) fits, a second does not. Mounting
    needs root (CI runs as root); elsewhere the tests skip, saying so."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_with_the_last_checkpoint_named_and_resume_is_exact(finished, small_disk, capsys):
    args, done = finished
    out = os.path.join(small_disk, "run")
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--output_dir", out])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert (f"saving checkpoint {out}/checkpoints/step_0000004 failed: writing {out}/checkpoints/.step_0000004.tmp "
            f"failed: the disk is full. The last complete checkpoint, {out}/checkpoints/step_0000002, is intact: "
            f"free space, then continue with --resume auto.") in err
    assert "Traceback" not in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000002"]  # no temp folder left
    subprocess.run(["mount", "-o", "remount,size=20m", small_disk], check=True)  # space freed
    train.main(args + ["--output_dir", out, "--resume", "auto"])
    assert_same_training(done, out)


def test_predict_out_on_a_full_disk_names_the_file_and_keeps_the_finished_lines(finished, small_disk, synthetic_dir):
    _, done = finished
    with open(os.path.join(small_disk, "filler"), "wb") as f:  # leave a few bytes: the first line fits
        f.write(b"\0" * (3 * 1024 * 1024 - 4096 - 200))
    results = os.path.join(small_disk, "results.jsonl")
    videos = [os.path.join(synthetic_dir, "videos", name) for name in sorted(os.listdir(os.path.join(synthetic_dir, "videos")))][:40]
    with pytest.raises(SystemExit) as stop:
        predict.main(["--checkpoint", f"{done}/checkpoints/step_0000004", *videos, "--out", results])
    assert str(stop.value).startswith(f"{results}: No space left on device; the videos done are in {results}")
    rows = [json.loads(line) for line in open(results) if line.endswith("\n")]
    assert rows and all(row["video"] in videos for row in rows)


def test_a_full_disk_turns_the_frame_cache_off_with_one_warning(small_disk, synthetic_dir):
    with open(os.path.join(small_disk, "filler"), "wb") as f:  # 8 KB left: no clip's frames fit
        f.write(b"\0" * (3 * 1024 * 1024 - 8192))
    cache = os.path.join(small_disk, "cache")
    videos = sorted(glob.glob(os.path.join(synthetic_dir, "videos", "*")))[:3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = [video.cached_clip(path, cache, 3136, 3136) for path in videos]
    (warning,) = caught  # one, for the first clip; the others are not tried
    assert str(warning.message).startswith(f"video cache: could not write {cache}/")
    assert "(No space left on device); the cache takes no more clips in this process" in str(warning.message)
    for path, (info, frames) in zip(videos, clips):  # the frames are right all the same
        with video.open_clip(path) as clip:
            assert info.num_frames == len(frames) == clip.info.num_frames
    assert not [name for _, _, files in os.walk(cache) for name in files]  # no temp file left
