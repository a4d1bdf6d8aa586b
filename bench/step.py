"""Training-step speed and peak memory: actcls's step against the peer's, same batch, same adapters.

    python bench/step.py                                   # CPU table: frames 8/16/32 x batch 1/4 (+ checkpointing rows)
    python bench/step.py --frames 16 --batch 4 --steps 2   # one shape
    python bench/step.py --family qwen3_vl                 # the same table for a tiny Qwen3-VL (any family of tests/conftest.py)
    python bench/step.py --device cuda --real qwen2_5_vl_3b   # Qwen2.5-VL-3B architecture on a GPU (see bench/RESULTS.md)
    python bench/step.py --device cuda --real qwen3_vl_4b     # Qwen3-VL-4B architecture on a GPU
    python bench/step.py --padding data/synthetic/train.jsonl   # padding fraction with/without length grouping

One step = forward + cross-entropy + backward + clip_grad_norm_ + AdamW step, on one batch built once
(random frames, the processor and chat template of the real run, the UCF101 settings: 320x240 clips,
video_max_pixels 16384, 2 fps). Variants:

  actcls      model.ActionClassifier: the inner Qwen2_5_VLModel on the sequence cut right after <ACT>,
              no lm_head (what train.py runs).
  inner_full  the same inner-model forward on the UNCUT conversation ("<ACT>", ".", "<|im_end|>", "\\n"):
              isolates the cut.
  peer        Qwen2_5_VLForConditionalGeneration(..., output_hidden_states=True) on the uncut
              conversation, as the LLaMA-Factory fork does: 151,936-way logits at every position, then
              hidden_states[-1] at <ACT> -> the same head -> the same loss. The output (logits included)
              is dropped before backward, as a Trainer's compute_loss does, which is the peer's best case.

So peer / inner_full is what lm_head (+ keeping every layer's hidden states) costs, and
inner_full / actcls is what the tokens after <ACT> cost. All three share one model layout: LoRA/DoRA as
in configs/ucf101.yaml (rank 16, alpha 32, dropout 0.05, every language-model Linear, vision frozen),
the <ACT> row as its own parameter, a 101-class linear head in fp32.

Memory, CPU. Each (variant, shape) runs in a fresh subprocess. After the model, optimizer and batch exist
and one warm-up step has run (so AdamW's state and oneDNN's caches exist), the worker calls glibc's
malloc_trim(0) (hands freed heap back to the kernel), writes "5" to /proc/self/clear_refs (Linux resets
the process's peak resident set size, VmHWM, to the current RSS) and records VmRSS as the baseline.
After the timed steps, `step peak` = VmHWM - baseline: the most extra resident memory one step needed
(saved activations, logits, gradients), measured by the kernel, not estimated. `total` = VmHWM (weights,
libraries and all). Where clear_refs cannot be written, the worker falls back to
getrusage(RUSAGE_SELF).ru_maxrss, which then also counts the warm-up and model build, and says so.
Memory, CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (total includes the weights).

Time is the median over --steps timed steps after the warm-up (CUDA: synchronised, 3 warm-ups).
MFU (CUDA only) = FLOPs of one actcls step without checkpointing (counted by torch.utils.flop_counter,
so the recomputation of checkpointing is not counted as useful work) / step time / the GPU's dense bf16
peak (989 TFLOPS for H100 SXM and H200, 756 for H100 PCIe; --peak-tflops overrides).
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from prepare.records import DEFAULT_MESSAGES as MESSAGES  # noqa: E402

VARIANTS = ("actcls", "inner_full", "peer")
CLIP_HW, CLIP_FPS = (240, 320), 25.0  # UCF101 clips are 320x240 at 25 fps
NUM_CLASSES = 101


# ---------------------------------------------------------------------------------------------------
# Model and batch

def qwen25_vl_3b_config():
    """Qwen/Qwen2.5-VL-3B-Instruct's architecture (config.json values); the weights will be random."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151_936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=True)


def qwen3_vl_4b_config():
    """Qwen/Qwen3-VL-4B-Instruct's architecture (config.json values); the weights will be random."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                                "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
        vision_config=dict(
            depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True)


REAL = {"qwen2_5_vl_3b": ("qwen2_5_vl", qwen25_vl_3b_config), "qwen3_vl_4b": ("qwen3_vl", qwen3_vl_4b_config)}


def model_config(args):
    if args.real:
        config = REAL[args.real][1]()
        if args.smoke:  # the real code path with 1 layer each, to check it runs (not a benchmark)
            config.text_config.num_hidden_layers, config.vision_config.depth = 1, 1
            if hasattr(config.vision_config, "fullatt_block_indexes"):
                config.vision_config.fullatt_block_indexes = [0]
            if hasattr(config.vision_config, "deepstack_visual_indexes"):
                config.vision_config.deepstack_visual_indexes = [0]
        return config
    from prepare.tiny_model import TinySize, tiny_config

    return tiny_config(TinySize(args.hidden, args.layers, args.heads, args.vision_depth, args.vision_hidden), args.family)


def train_config(args, gradient_checkpointing):
    from config import Config

    return Config(model_name_or_path="(built in memory)", attn_implementation=args.attn_implementation,
                  num_action_classes=NUM_CLASSES, finetuning_type="lora", lora_rank=16, lora_alpha=32.0,
                  lora_dropout=0.05, lora_target="all", use_dora=not args.lora, bf16=args.bf16,
                  gradient_checkpointing=gradient_checkpointing, learning_rate=5e-5, weight_decay=0.01)


def build(args, gradient_checkpointing):
    """(processor, classifier, optimizer, cfg) exactly as model.build_classifier + model.build_optimizer
    make them, but from a config built in memory instead of a checkpoint directory."""
    from transformers import AutoModelForImageTextToText

    from decoder import ActionDecoder
    from model import ACT_TOKEN, ActionClassifier, apply_finetuning, build_optimizer
    from prepare.tiny_model import build_processor

    processor = build_processor(256, args.video_max_pixels, family=args.family)
    processor.tokenizer.add_special_tokens({"extra_special_tokens": [ACT_TOKEN]}, replace_extra_special_tokens=False)
    act_id = processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN)
    cfg = train_config(args, gradient_checkpointing)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32  # as model.load_vlm: frozen base in bf16 under lora
    with torch.device(args.device):
        vlm = AutoModelForImageTextToText.from_config(model_config(args), dtype=dtype,
                                                      attn_implementation=cfg.attn_implementation)
    vlm = apply_finetuning(vlm, cfg)
    hidden = vlm.config.get_text_config().hidden_size
    classifier = ActionClassifier(vlm, act_id, {"default": ActionDecoder(hidden, NUM_CLASSES)}).to(args.device)
    classifier.train()
    return processor, classifier, build_optimizer(classifier, cfg), cfg


def make_batch(processor, act_id, num_frames, batch_size, cut, max_pixels, device):
    """One batch of `batch_size` random clips of `num_frames` frames. cut=True: data.Collator's output
    (cut after <ACT>); cut=False: the same processor call on the whole conversation."""
    from transformers.video_utils import VideoMetadata

    from data import Collator, Item, Sample, prompt_messages
    from model import vision_geometry
    from video import VideoInfo, sample_indices, smart_resize

    h, w = smart_resize(*CLIP_HW, vision_geometry(processor)["resize_factor"], 256, max_pixels)
    rng = np.random.default_rng(0)
    clip_len = int(num_frames / 2.0 * CLIP_FPS)  # a clip whose 2-fps sampling gives num_frames frames
    items = []
    for i in range(batch_size):
        sample = Sample(video=f"random_{i}", messages=MESSAGES, label=i % NUM_CLASSES, label_space="default",
                        source="bench")
        items.append(Item(sample, rng.integers(0, 256, (num_frames, h, w, 3), dtype=np.uint8),
                          sample_indices(clip_len, num_frames), VideoInfo(clip_len, CLIP_FPS, CLIP_HW[1], CLIP_HW[0]),
                          i, True, []))
    if cut:
        batch = Collator(processor, act_id)(items)
        inputs, labels = batch.inputs, batch.labels
    else:
        text = processor.apply_chat_template(prompt_messages(MESSAGES), tokenize=False)
        metadata = [VideoMetadata(total_num_frames=clip_len, fps=CLIP_FPS, frames_indices=it.indices.tolist())
                    for it in items]
        out = processor(text=[text] * batch_size, videos=[it.frames for it in items], video_metadata=metadata,
                        do_resize=False, do_sample_frames=False, padding=True, return_tensors="pt")
        inputs = {k: v for k, v in out.items() if torch.is_tensor(v)}  # as data.Collator passes them
        inputs["act_index"] = (out["input_ids"] == act_id).int().argmax(1)
        labels = torch.tensor([it.sample.label for it in items])
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


# ---------------------------------------------------------------------------------------------------
# The three steps

def peer_loss(classifier, inputs, labels):
    """The peer's forward: full causal-LM output with every layer's hidden states; the returned loss is
    all that survives into backward (the logits are freed here, as in a Trainer's compute_loss)."""
    act_index = inputs["act_index"]
    kwargs = {k: v for k, v in inputs.items() if k != "act_index"}
    out = classifier.vlm(output_hidden_states=True, use_cache=False, **kwargs)  # the <ACT> row: the classifier's hook
    rows = torch.arange(act_index.shape[0], device=act_index.device)
    logits = classifier.heads["default"](out.hidden_states[-1][rows, act_index])
    return F.cross_entropy(logits.float(), labels)


def step(variant, classifier, optimizer, inputs, labels, cfg):
    autocast = (torch.autocast(labels.device.type, dtype=torch.bfloat16) if cfg.bf16
                else torch.autocast(labels.device.type, enabled=False))
    with autocast:
        if variant == "peer":
            loss = peer_loss(classifier, inputs, labels)
        else:
            loss = F.cross_entropy(classifier("default", **inputs).float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ---------------------------------------------------------------------------------------------------
# CPU: one measurement per fresh process

def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """True when the kernel's peak-RSS counter was reset (Linux >= 4.0 with a writable clear_refs)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created while it is active and still alive: every op's
    new output storages (forward, backward and optimizer ops alike; views and in-place results of
    existing tensors are not new) are counted once and dropped when freed (a weakref callback). No allocator noise and no estimate, but
    also nothing outside tensors (oneDNN scratch, Python objects): the complement of the RSS figure."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key, nbytes, _ref):
        self.current -= nbytes
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in inputs:  # a new storage, not a view or in-place result
                    nbytes = storage.nbytes()
                    self.live[key] = weakref.ref(storage, partial(self._free, key, nbytes))
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def worker(args):
    """Prints one JSON line: the measurement of args.variant at (args.frames[0], args.batch[0])."""
    import resource

    torch.set_num_threads(args.threads)
    frames, batch_size, variant = args.frames[0], args.batch[0], args.variant
    processor, classifier, optimizer, cfg = build(args, args.gc)
    inputs, labels = make_batch(processor, classifier.act_token_id, frames, batch_size, variant == "actcls",
                                args.video_max_pixels, args.device)
    step(variant, classifier, optimizer, inputs, labels, cfg)  # warm-up: AdamW state, allocator, oneDNN
    if reset_peak_rss():
        method, baseline = "VmHWM after clear_refs", rss_kib("VmRSS")
    else:
        method, baseline = "ru_maxrss (includes build)", rss_kib("VmRSS")
    times, cpu_times = [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step(variant, classifier, optimizer, inputs, labels, cfg)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    peak = rss_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracker = TensorMemory()
    with tracker:  # one more step, untimed: the tensor-level peak
        step(variant, classifier, optimizer, inputs, labels, cfg)
    print(json.dumps({"variant": variant, "frames": frames, "batch": batch_size, "gc": args.gc,
                      "seq_len": int(inputs["input_ids"].shape[1]), "time_s": min(times),
                      "median_s": statistics.median(times), "cpu_s": min(cpu_times),
                      "times": [round(t, 3) for t in times], "step_peak_mib": (peak - baseline) / 1024,
                      "total_mib": peak / 1024, "tensor_peak_mib": tracker.peak / 2**20, "method": method}), flush=True)


def run_worker(args, variant, frames, batch_size, gc):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--frames", str(frames),
           "--batch", str(batch_size), "--steps", str(args.steps), "--threads", str(args.threads),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
           "--vision-depth", str(args.vision_depth), "--vision-hidden", str(args.vision_hidden),
           "--video-max-pixels", str(args.video_max_pixels), "--attn-implementation", args.attn_implementation,
           "--family", args.family]
    cmd += ["--gc"] if gc else []
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--lora"] if args.lora else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_main(args):
    print(f"# bench/step.py on CPU, {time.strftime('%Y-%m-%d %H:%M')}, {args.threads} thread(s) per worker: "
          f"{args.family} layout (prepare/tiny_model.tiny_config), text hidden {args.hidden} x {args.layers} layers "
          f"({args.heads} heads), vision {args.vision_hidden} x {args.vision_depth}, {'LoRA' if args.lora else 'DoRA'} r16 (dropout 0.05) on "
          f"every LM Linear, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.attn_implementation}; random "
          f"320x240 clips at video_max_pixels {args.video_max_pixels}; time = fastest of {args.steps} steps after "
          f"1 warm-up; each cell a fresh process", flush=True)
    header = (f"{'frames':>6} {'batch':>5} {'L cut/full':>10} | {'time s: actcls':>14} {'inner_full':>10} {'peer':>6} | "
              f"{'tensor MiB: actcls':>18} {'inner_full':>10} {'peer':>6} | {'RSS MiB: actcls':>15} {'peer':>6} | "
              f"{'speedup':>7} {'mem (tensor)':>12} {'mem (RSS)':>9} | {'logits MiB':>10}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for frames in args.frames:
        for batch_size in args.batch:
            r = {v: run_worker(args, v, frames, batch_size, False) for v in VARIANTS}
            a, i, p = r["actcls"], r["inner_full"], r["peer"]
            rows.append(r)
            logits = batch_size * p["seq_len"] * 151_936 * (2 if args.bf16 else 4) / 2**20
            print(f"{frames:>6} {batch_size:>5} {a['seq_len']:>4}/{p['seq_len']:<5} | {a['time_s']:>14.3f} "
                  f"{i['time_s']:>10.3f} {p['time_s']:>6.3f} | {a['tensor_peak_mib']:>18.0f} {i['tensor_peak_mib']:>10.0f} "
                  f"{p['tensor_peak_mib']:>6.0f} | {a['step_peak_mib']:>15.0f} {p['step_peak_mib']:>6.0f} | "
                  f"{p['time_s'] / a['time_s']:>6.2f}x {a['tensor_peak_mib'] / p['tensor_peak_mib']:>11.2f}x "
                  f"{a['step_peak_mib'] / p['step_peak_mib']:>8.2f}x | {logits:>10.0f}", flush=True)
    print("speedup = peer time / actcls time; mem = actcls step peak / peer step peak (tensor: live tensor bytes; "
          "RSS: kernel peak RSS); logits = B x L x 151,936 x 4 bytes")
    print("\nwhere the saving comes from (peer - inner_full = lm_head + all hidden states; inner_full - actcls = the "
          "3 tokens after <ACT>):")
    for r in rows:
        a, i, p = r["actcls"], r["inner_full"], r["peer"]
        print(f"  frames {a['frames']:>2} batch {a['batch']}: time  lm_head {p['time_s'] - i['time_s']:6.3f} s "
              f"({(p['time_s'] - i['time_s']) / (p['time_s'] - a['time_s']):4.0%}), cut {i['time_s'] - a['time_s']:6.3f} s; "
              f"tensor memory  lm_head {p['tensor_peak_mib'] - i['tensor_peak_mib']:5.0f} MiB, "
              f"cut {i['tensor_peak_mib'] - a['tensor_peak_mib']:4.0f} MiB", flush=True)
    if args.gc_shapes:
        print("\ngradient checkpointing (actcls): off -> on")
        for shape in args.gc_shapes:
            frames, batch_size = (int(x) for x in shape.split("x"))
            off = run_worker(args, "actcls", frames, batch_size, False)
            on = run_worker(args, "actcls", frames, batch_size, True)
            print(f"  frames {frames:>2} batch {batch_size}: time {off['time_s']:.3f} -> {on['time_s']:.3f} s "
                  f"({on['time_s'] / off['time_s']:.2f}x); tensor peak {off['tensor_peak_mib']:.0f} -> "
                  f"{on['tensor_peak_mib']:.0f} MiB ({on['tensor_peak_mib'] / off['tensor_peak_mib']:.2f}x); RSS step "
                  f"peak {off['step_peak_mib']:.0f} -> {on['step_peak_mib']:.0f} MiB", flush=True)
    print(f"RSS method: {rows[0]['actcls']['method']}")


# ---------------------------------------------------------------------------------------------------
# CUDA: the 3B architecture, in one process (the CUDA allocator's peak counter resets cleanly)

def peak_tflops(args):
    if args.peak_tflops is not None:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756.0
    if "H100" in name or "H200" in name or "GH200" in name:
        return 989.0
    if "A100" in name:
        return 312.0
    raise SystemExit(f"unknown dense bf16 peak for {name!r}: pass --peak-tflops")


def step_flops(variant, classifier, optimizer, inputs, labels, cfg):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(variant, classifier, optimizer, inputs, labels, cfg)
    return counter.get_total_flops()


def set_checkpointing(classifier, on):
    vlm = classifier.vlm.get_base_model() if hasattr(classifier.vlm, "get_base_model") else classifier.vlm
    if on:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        vlm.gradient_checkpointing_disable()


def cuda_main(args):
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    processor, classifier, optimizer, cfg = build(args, False)
    act_id = classifier.act_token_id
    tflops = peak_tflops(args) if cuda else None
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    frames = args.frames[0]
    print(f"# bench/step.py --real {args.real} on {name}, {time.strftime('%Y-%m-%d %H:%M')}: {args.real} architecture, "
          f"random weights, {'bf16 base + autocast' if cfg.bf16 else 'fp32'}, {'LoRA' if args.lora else 'DoRA'} r16 all LM Linears, "
          f"{cfg.attn_implementation}, {frames} frames 320x240 at video_max_pixels {args.video_max_pixels}; "
          f"median of {args.steps} steps after {args.warmup} warm-ups; peak = torch.cuda.max_memory_allocated"
          + (f"; MFU against {tflops:.0f} TFLOPS dense bf16" if cuda else ""), flush=True)
    print(f"{'variant':>8} {'batch':>5} {'gc':>3} {'L':>4} | {'step s':>7} {'videos/s':>8} | {'peak GiB':>8} "
          f"{'step GiB':>8} | {'TFLOP/step':>10} {'MFU':>6}")
    for batch_size in args.batch:
        batches = {v: make_batch(processor, act_id, frames, batch_size, v == "actcls", args.video_max_pixels,
                                 args.device) for v in ("actcls", "peer")}
        flops = {}
        for gc in (False, True):
            set_checkpointing(classifier, gc)
            for variant in ("actcls", "peer"):
                inputs, labels = batches[variant]
                try:
                    if not gc:  # model FLOPs: counted without recomputation, used for both rows
                        flops[variant] = step_flops(variant, classifier, optimizer, inputs, labels, cfg)
                    for _ in range(args.warmup):
                        step(variant, classifier, optimizer, inputs, labels, cfg)
                    sync()
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() if cuda else 0
                    times = []
                    for _ in range(args.steps):
                        sync()
                        t = time.perf_counter()
                        step(variant, classifier, optimizer, inputs, labels, cfg)
                        sync()
                        times.append(time.perf_counter() - t)
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    print(f"{variant:>8} {batch_size:>5} {'on' if gc else 'off':>3} | out of memory", flush=True)
                    continue
                t = statistics.median(times)
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                step_flop = flops.get(variant, float("nan"))
                mfu = step_flop / t / (tflops * 1e12) if cuda else float("nan")
                print(f"{variant:>8} {batch_size:>5} {'on' if gc else 'off':>3} {inputs['input_ids'].shape[1]:>4} | "
                      f"{t:>7.3f} {batch_size / t:>8.2f} | {peak:>8.2f} {peak - base / 2**30:>8.2f} | "
                      f"{step_flop / 1e12:>10.2f} {100 * mfu:>5.1f}%", flush=True)


# ---------------------------------------------------------------------------------------------------
# Padding: what length grouping saves

def padding_main(args):
    """Padding fraction of one epoch of training batches (padded token slots / all slots), with and
    without group_by_length. A sample's length is exact without decoding: its video tokens
    (data.sample_lengths, from a probe) + its text tokens (the cut prompt, tokenized, minus the one
    <|video_pad|> placeholder the processor expands)."""
    from batch_plan import StepLayout, train_batches
    from data import VideoDataset, load_samples, prompt_text, sample_lengths
    from video import VideoSettings
    from model import ACT_TOKEN
    from prepare.tiny_model import build_processor

    processor = build_processor(args.video_min_pixels, args.video_max_pixels)
    processor.tokenizer.add_special_tokens({"extra_special_tokens": [ACT_TOKEN]}, replace_extra_special_tokens=False)
    settings = VideoSettings(args.video_fps, args.video_maxlen, None, args.video_min_pixels, args.video_max_pixels)
    parts = [load_samples(path, None, 10**9)[0] for path in args.padding]  # (samples, bad_videos)
    dataset = VideoDataset([s for part in parts for s in part], settings)
    text = np.array([len(processor.tokenizer(prompt_text(processor, s.messages))["input_ids"]) - 1
                     for s in dataset.samples])
    lengths = sample_lengths(dataset) + text
    sizes, weights = [len(p) for p in parts], [1.0] * len(parts)
    print(f"{len(dataset)} samples from {', '.join(args.padding)}; video_fps {args.video_fps}, video_maxlen "
          f"{args.video_maxlen}, video pixels [{args.video_min_pixels}, {args.video_max_pixels}]; tokens per sample: "
          f"min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}")
    for batch_size in args.batch:
        row = []
        for grouped in (False, True):
            batches = train_batches(sizes, weights, StepLayout(batch_size, 1, 1, 0), 0, 0, lengths if grouped else None)
            slots = sum(len(b) * max(lengths[j] for j, _, _ in b) for b in batches)
            used = sum(lengths[j] for b in batches for j, _, _ in b)
            row.append(1 - used / slots)
        print(f"  batch {batch_size:>2}: padding {100 * row[0]:5.1f}% -> {100 * row[1]:5.1f}% with group_by_length")


# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--real-3b", action="store_true", help="the same as --real qwen2_5_vl_3b")
    p.add_argument("--real", choices=sorted(REAL), default=None, help="a real architecture (random weights), for GPUs")
    p.add_argument("--family", default="qwen2_5_vl", help="the tiny model's family (qwen2_vl, qwen3_vl, qwen3_5, ...)")
    p.add_argument("--smoke", action="store_true", help="with --real: 1 layer each, to check the code path")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="frames per clip (default 8 16 32; 3B: 16)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 4; 3B: 1 4 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default CPU 3, CUDA 10)")
    p.add_argument("--warmup", type=int, default=3, help="CUDA warm-up steps")
    p.add_argument("--gc-shapes", nargs="*", default=["16x4", "32x4"], help="FRAMESxBATCH checkpointing rows (CPU)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--video-max-pixels", type=int, default=16384, help="configs/ucf101.yaml's video_max_pixels")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--bf16", action="store_true", help="bf16 base + autocast (always on with --real)")
    p.add_argument("--lora", action="store_true", help="plain LoRA instead of DoRA (to see what DoRA's weight norm costs)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (1: steadiest on a shared machine)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--padding", nargs="+", metavar="JSONL", help="report padding with/without length grouping")
    p.add_argument("--video-fps", type=float, default=2.0, help="--padding: the run's video_fps")
    p.add_argument("--video-min-pixels", type=int, default=256, help="--padding: the run's video_min_pixels")
    p.add_argument("--video-maxlen", type=int, default=16, help="--padding: the run's video_maxlen")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.real_3b:  # the flag bench/RESULTS.md's first GPU table was made with
        args.real = "qwen2_5_vl_3b"
    if args.real:
        args.family = REAL[args.real][0]
        args.bf16 = True  # configs/ucf101.yaml trains in bf16
    args.frames = args.frames if args.frames is not None else ([16] if args.real else [8, 16, 32])
    args.batch = args.batch if args.batch is not None else ([1, 4, 8] if args.real or args.padding else [1, 4])
    args.steps = args.steps if args.steps is not None else (10 if args.device == "cuda" else 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.padding:
        padding_main(args)
    elif args.worker:
        worker(args)
    elif args.real or args.device == "cuda":
        cuda_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
