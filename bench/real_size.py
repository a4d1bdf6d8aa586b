"""Real sizes on CPU: Qwen2.5-VL-3B and Qwen3-VL-4B at full depth, random weights, bf16, through
what a user runs, each stage a subprocess of the real script, its wall time, CPU time and peak RSS.

    nice -n 19 python bench/real_size.py --work /tmp/real_size [--models qwen2.5-vl-3b qwen3-vl-4b]

Stages, per model (the configs are the shipped configs/ucf101*.yaml, with only paths, batch, steps
and the head's class count changed):
  build    prepare/tiny_model.py --config <the released config.json> --bf16: the checkpoint folder
  train    train.py: one optimizer step, batch 1, DoRA on every Linear, bf16, then its checkpoint save
           (--train_extra KEY VALUE ...: more overrides, e.g. gradient_checkpointing true)
  checkpoint without a step: only when the step did not write one (it did not fit, or --skip train):
           the files train.py writes, adapters perturbed instead of trained, for the stages below
  eval     train.py --eval_only on 2 clips
  export   export.py (the streamed merge, merge.py)
  predict  VideoClassifier.from_pretrained(export).predict(2 clips)
--skip leaves stages out; a rerun reuses a base checkpoint and a checkpoint it finds (--keep keeps
them: 15-18 GB a model, deleted otherwise). Peak RSS is the kernel's (wait4's ru_maxrss: the largest
resident size of the process, or of a child it waited for); a stage whose process tree goes over
--max_rss_gb or --max_minutes is stopped and reported as such. Ratios are against the base
checkpoint's size on disk, measured in the same run; absolute times are this machine's only.
Results: bench/RESULTS.md, "Real sizes on CPU".

The configs below are the released config.json files of the two models (values as published; the
hub itself is not reachable from here), from copies found in public sources:
- Qwen/Qwen2.5-VL-3B-Instruct: the config.json as published (transformers_version 4.41.2), e.g. in
  huggingface.co/dahwinsingularity/vllm2 and huggingface.co/zyoNoob/Qwen2.5-VL-3B-Instruct-AWQ
  (`_name_or_path` the Qwen snapshot; top-level keys), the vision_config's depth, widths and
  full-attention blocks as in the Qwen2.5-VL-3B configs quoted in several public repositories.
- Qwen/Qwen3-VL-4B-Instruct: its config.json (transformers_version 4.57.0.dev0), as uploaded in
  huggingface.co/TechCarbasa/MyModels (commit 400bbbf, Qwen3-VL-4B-Instruct/config.json) and
  vendored verbatim in public code ("Vendored copy of the Qwen3-VL-4B-Instruct config.json").
The vocabulary stays at the real 151,936 rows (both tie lm_head to it).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.proctree import ProcessTree, rss_mb  # noqa: E402

QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
                    "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": True, "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 2560, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}
# name -> (family for prepare/tiny_model.py, released config, the shipped training config)
MODELS = {"qwen2.5-vl-3b": ("qwen2_5_vl", QWEN25_VL_3B, "configs/ucf101.yaml"),
          "qwen3-vl-4b": ("qwen3_vl", QWEN3_VL_4B, "configs/ucf101_qwen3vl.yaml")}
# UCF101-like clips: 7 s (its mean length) at 25 fps; prepare/synthetic.py writes square frames (UCF101: 320x240)
CLIP_SIZE, CLIP_FRAMES, CLIP_FPS = 240, 175, 25


class Limits:
    def __init__(self, max_rss_gb, max_minutes):
        self.max_rss_mb, self.max_seconds = max_rss_gb * 1024, max_minutes * 60


def run_stage(name, argv, limits, log_path):
    """Runs argv (python, from the repository root) to the end or to a limit. Returns a result row."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    tree, done, stopped = ProcessTree(child.pid), threading.Event(), []
    tree.start()
    threading.Thread(target=watch, args=(child.pid, tree, (limits, start), done, stopped), daemon=True).start()
    # wait4, not Popen.wait: the kernel's peak RSS and CPU time of the child come with its exit status
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    child.returncode = os.waitstatus_to_exitcode(status)
    tree.stop()
    return {"stage": name, "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "exit": child.returncode, "stopped": stopped[0] if stopped else None,
            "load_avg_at_start": load, "log": log_path}


def watch(pid, tree, limits_and_start, done, stopped):
    """Stops the stage's process tree when its resident memory (all its processes together) or its
    time goes over the limit. Only reads /proc: the main thread alone reaps the child."""
    limits, start = limits_and_start
    while not done.wait(0.5):
        total = sum(rss_mb(p) for p in [pid, *tree.alive()])
        elapsed = time.perf_counter() - start
        over = ("RSS over the limit" if total > limits.max_rss_mb else
                "time over the limit" if elapsed > limits.max_seconds else None)
        if over:
            stopped.append(f"stopped: {over} ({total / 1024:.1f} GiB at {elapsed / 60:.1f} min)")
            tree.kill_all()
            os.kill(pid, 9)
            return


def folder_gb(directory):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(directory) for n in names) / 2**30


def make_clips(work, limits):
    clips = os.path.join(work, "clips")
    if not os.path.isfile(os.path.join(clips, "val.jsonl")):
        run_stage("clips", ["prepare/synthetic.py", "--out", clips, "--train", "2", "--val", "2", "--size",
                            str(CLIP_SIZE), "--frames", str(CLIP_FRAMES), "--fps", str(CLIP_FPS), "--workers", "1"],
                  limits, os.path.join(work, "clips.log"))
    return clips


# When the training step cannot run (memory), the later stages still need a checkpoint of the real
# size: this one is what train.py writes (checkpoint.write_checkpoint_files, weights only), for the
# same config, with the adapters moved off their initial values instead of trained.
UNTRAINED_CHECKPOINT = """
import json, sys, torch
import llamafactory
from checkpoint import full_trainable_state, write_checkpoint_files
from config import head_sizes
from model import build_classifier
cfg = llamafactory.parse_config(sys.argv[2:])
_, model = build_classifier(cfg, head_sizes(cfg))
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.01 * torch.randn_like(p))
classes = {"default": json.load(open(sys.argv[1]))}
write_checkpoint_files(cfg.output_dir + "/checkpoints/step_0000001", model, (full_trainable_state(model), None),
                       {"step": 1, "epoch": 0, "weights_only": True}, cfg, classes)
"""


def stages(name, work, clips, train_extra):
    """(stage, argv) in order, for one model; train_extra: more --key value for the training step."""
    family, _, config = MODELS[name]
    here = os.path.join(work, name)
    base, run, export = (os.path.join(here, d) for d in ("base", "run", "export"))
    checkpoint = os.path.join(run, "checkpoints", "step_0000001")
    # num_action_classes: the clips' 6 classes (UCF101's head has 101 outputs: 2048 x 101 floats more)
    common = ["--config", config, "--model_name_or_path", base, "--dataloader_num_workers", "0",
              "--num_action_classes", "6"]
    videos = sorted(os.path.join(clips, "videos", v) for v in os.listdir(os.path.join(clips, "videos"))
                    if v.startswith("val_"))
    predict = ("import sys; from inference import VideoClassifier; "
               "clf = VideoClassifier.from_pretrained(sys.argv[1], device='cpu'); "
               "print(clf.predict(sys.argv[2:], top_k=3))")
    return [("build", ["prepare/tiny_model.py", "--family", family, "--config", os.path.join(here, "config.json"),
                       "--bf16", "--out", base]),
            ("train", ["train.py", *common, "--train_datasets", f"[{{path: {clips}/train.jsonl}}]",
                       "--eval_datasets", "[]", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                       "1", "--max_steps", "1", "--save_steps", "1", "--eval_steps", "0", "--logging_steps", "1",
                       "--output_dir", run, *train_extra]),
            ("checkpoint without a step", ["-c", UNTRAINED_CHECKPOINT, os.path.join(clips, "classes.json"), *common,
                                           "--train_datasets", f"[{{path: {clips}/train.jsonl}}]",
                                           "--output_dir", run]),
            ("eval", ["train.py", *common, "--eval_only", "--checkpoint", checkpoint,
                      "--eval_datasets", f"[{{path: {clips}/val.jsonl}}]", "--per_device_eval_batch_size",
                      "1", "--output_dir", os.path.join(here, "eval")]),
            ("export", ["export.py", "--checkpoint", checkpoint, "--out", export]),
            ("predict", ["-c", predict, export, *videos])]


def skipped(stage, here, skip):
    """Whether a stage is left out: asked to be, or its output is there already (a rerun reuses them)."""
    done = {"build": os.path.join(here, "base", "model.safetensors"),
            "checkpoint without a step": os.path.join(here, "run", "checkpoints", "step_0000001")}
    if stage in done and os.path.exists(done[stage]):
        print(f"reusing {done[stage]} (remove it to run {stage} again)", flush=True)
        return True
    return stage in skip


def bench_model(name, work, clips, limits, options):
    here = os.path.join(work, name)
    os.makedirs(here, exist_ok=True)
    with open(os.path.join(here, "config.json"), "w") as f:
        json.dump(MODELS[name][1], f, indent=1)
    rows = []
    for stage, argv in stages(name, work, clips, options.train_extra):
        if skipped(stage, here, options.skip):
            continue
        row = run_stage(stage, argv, limits, os.path.join(here, f"{stage}.log"))
        rows.append(row)
        print(json.dumps({"model": name, **row}), flush=True)
        if row["exit"] != 0 and stage in ("build", "checkpoint without a step", "export"):
            break  # the later stages need this one's output (a failed step: the checkpoint without one)
    sizes = {d: folder_gb(os.path.join(here, d)) for d in ("base", "export") if os.path.isdir(os.path.join(here, d))}
    # 15-18 GB a model; a failed run keeps them for a rerun
    if not options.keep and all(r["exit"] == 0 for r in rows if r["stage"] != "train"):
        for d in ("base", "run", "export"):
            shutil.rmtree(os.path.join(here, d), ignore_errors=True)
    return rows, sizes


def table(name, rows, sizes):
    base = sizes["base"]
    lines = [f"{name}: base checkpoint {base:.2f} GiB on disk" + (f", export {sizes['export']:.2f} GiB"
                                                                   if "export" in sizes else ""), "",
             "| stage | wall (this CPU) | CPU time | peak RSS | RSS / base size | result |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        result = r["stopped"] or ("ok" if r["exit"] == 0 else f"exit {r['exit']} (see {r['log']})")
        lines.append(f"| {r['stage']} | {r['wall_s'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min | "
                     f"{r['peak_rss_mb'] / 1024:.2f} GiB | {r['peak_rss_mb'] / 1024 / base:.2f} | {result} |")
    export = [r for r in rows if r["stage"] == "export" and r["exit"] == 0]
    if export and "export" in sizes:
        lines += ["", f"export peak RSS / exported folder size: {export[0]['peak_rss_mb'] / 1024:.2f} GiB / "
                      f"{sizes['export']:.2f} GiB = {export[0]['peak_rss_mb'] / 1024 / sizes['export']:.2f}"]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/real_size", help="where the checkpoints go (GBs; not in the repository)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--max_rss_gb", type=float, default=16.0, help="a stage over this (all its processes) is stopped")
    p.add_argument("--max_minutes", type=float, default=15.0, help="a stage running longer is stopped")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints, run folder and export afterwards")
    p.add_argument("--skip", nargs="*", default=[], choices=["build", "train", "eval", "export", "predict"],
                   help="stages not to run (a skipped train: the checkpoint without a step stands in)")
    p.add_argument("--train_extra", nargs="*", default=[],
                   help="more train.py overrides for the step, e.g. gradient_checkpointing true (give them "
                        "without the leading --: KEY VALUE ...)")
    args = p.parse_args()
    args.train_extra = [f"--{v}" if i % 2 == 0 else v for i, v in enumerate(args.train_extra)]
    limits = Limits(args.max_rss_gb, args.max_minutes)
    os.makedirs(args.work, exist_ok=True)
    clips = make_clips(args.work, limits)
    for name in args.models:
        rows, sizes = bench_model(name, args.work, clips, limits, args)
        print(table(name, rows, sizes), flush=True)


if __name__ == "__main__":
    main()
