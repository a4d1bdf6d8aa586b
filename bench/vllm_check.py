"""vLLM's pooling runner on actcls's seq-cls exports: the same clips, vLLM's logits against VideoClassifier's.

    python bench/vllm_check.py                          # pip install vllm (needs the package index)
    python bench/vllm_check.py --wheels /data/wheels    # offline: vllm and its dependencies as wheels

NOT RUN YET: no GPU has been lent to a session that had this script, so nothing it claims is measured;
docs/ship.md says so until a run is recorded there. Planned for one lent GPU (H100), under 8 minutes.

For each of two Qwen2.5-VL models, both random (nothing is downloaded but vLLM itself):
  tiny       prepare/tiny_model.py's default (what the tests and the demo train), and
  real-size  Qwen2.5-VL-3B's widths (hidden 2048, 16 heads, 2 KV heads, MLP 11008, vision 1280 x 16
             heads, MLP 3420), --layers language layers (4; --layers 36 --vision-depth 32 for all of it),
it
  1. trains one LoRA step on generated clips (train.py), writes `export.py --as seq-cls --dtype bf16`;
  2. computes actcls's logits on --clips validation clips (VideoClassifier on the checkpoint, fp32);
  3. writes each clip's sampled, scaled frames, exactly those, as a lossless FFV1 clip at their sampled
     frame rate, so vLLM reads the frames actcls read (vLLM samples frames its own way, not by TSN);
  4. serves the export in its own venv (vLLM pins its own torch and transformers):
       vllm serve EXPORT --runner pooling --dtype bfloat16 --max-model-len 4096 --enforce-eager
         --allowed-local-media-path WORK --limit-mm-per-prompt '{"video": 1}'
  5. posts each clip to /classify as chat messages that end at <ACT> (continue_final_message: the
     assistant turn stays open, as actcls cuts its input), use_activation false (raw logits), every
     frame of the lossless clip (media_io_kwargs num_frames), and adds actcls.json's score_bias;
  6. prints, per model: the largest |logit difference|, the largest |probability difference| and
     whether the top-1 classes agree. vLLM runs bf16 and actcls fp32: differences of ~1e-2 in the
     logits are bf16 rounding; a wrong pooled token or wrong frames show as O(1).
Exit code 0 when every model served and the top-1 classes agreed on every clip.
"""

import argparse
import fractions
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import av  # noqa: E402
import torch  # noqa: E402

from data import Collator, VideoDataset  # noqa: E402
from inference import VideoClassifier  # noqa: E402
from prepare.synthetic import main as make_synthetic  # noqa: E402
from prepare.tiny_model import build_processor, write_tiny_model  # noqa: E402

PORT = 8321
QWEN25_VL_3B = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                    vision_hidden=1280, vision_intermediate=3420, vision_heads=16)


def step(name, start):
    print(f"[{time.time() - start:6.1f} s] {name}", flush=True)


def run(cmd, **kwargs):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def install_vllm(venv, version, wheels):
    """vLLM in a venv of its own, so actcls's pinned torch and transformers stay as they are."""
    run([sys.executable, "-m", "venv", venv])
    pip = [os.path.join(venv, "bin", "pip"), "install", "-q"]
    spec = f"vllm=={version}" if version else "vllm"
    run(pip + (["--no-index", "--find-links", wheels, spec] if wheels else [spec]))
    return os.path.join(venv, "bin", "vllm")


def real_size_model(out, layers, vision_depth):
    """Qwen2.5-VL-3B's architecture (its widths; `layers` and `vision_depth` deep), random, bf16,
    with the tiny model's processor and tokenizer (the real Qwen tokenizer)."""
    import transformers

    s = QWEN25_VL_3B
    text = dict(vocab_size=151936, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                num_hidden_layers=layers, num_attention_heads=s["num_attention_heads"],
                num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    vision = dict(depth=vision_depth, hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
                  num_heads=s["vision_heads"], out_hidden_size=s["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  fullatt_block_indexes=[i for i in range(vision_depth) if i % 8 == 7] or [vision_depth - 1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    build_processor().save_pretrained(out)
    return out


def train_and_export(base, data, work):
    """One LoRA step (bf16 autocast on a GPU), then the seq-cls export. Returns (checkpoint, export)."""
    run_dir, export_dir = os.path.join(work, "run"), os.path.join(work, "seq-cls")
    run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "synthetic.yaml"),
         "--model_name_or_path", base, "--train_datasets", f"[{{path: {data}/train.jsonl}}]", "--eval_datasets", "[]",
         "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--max_steps", "1",
         "--report_to", "none", "--output_dir", run_dir])
    checkpoint = os.path.join(run_dir, "checkpoints", "step_0000001")
    run([sys.executable, os.path.join(ROOT, "export.py"), "--checkpoint", checkpoint, "--out", export_dir,
         "--as", "seq-cls", "--dtype", "bf16"])
    return checkpoint, export_dir


def actcls_logits(checkpoint, videos):
    """VideoClassifier's logits (fp32) and the dataset items (the exact frames it read), one view."""
    clf = VideoClassifier.from_pretrained(checkpoint, fp32=True)
    samples = clf.samples(videos)
    dataset = VideoDataset(samples, clf.settings)
    items = [dataset[(i, 0, False)] for i in range(len(samples))]
    batch = Collator(clf.processor, clf.model.act_token_id)(items)
    with torch.no_grad():
        logits = clf.model("default", **{k: v.to(clf.device) for k, v in batch.inputs.items()}).float().cpu()
    return logits, items, clf.prompt


def lossless_clip(item, path):
    """The item's frames, exactly, as an FFV1 clip at their sampled frame rate (T frames over the span
    they sample), so a reader that takes every frame gets actcls's frames and the same seconds per
    temporal patch (Qwen2.5-VL's second_per_grid_ts)."""
    sampled_fps = len(item.indices) / item.info.num_frames * item.info.fps
    with av.open(path, "w") as container:
        stream = container.add_stream("ffv1", rate=fractions.Fraction(sampled_fps).limit_denominator(1000))
        stream.height, stream.width = item.frames.shape[1:3]
        stream.pix_fmt = "bgr0"  # RGB, losslessly
        for frame in item.frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="bgr0")))
        container.mux(stream.encode())
    return path


def serve(vllm, export_dir, log):
    """`vllm serve` in the background; returns the process once /health answers."""
    cmd = [vllm, "serve", export_dir, "--runner", "pooling", "--dtype", "bfloat16", "--max-model-len", "4096",
           "--enforce-eager", "--gpu-memory-utilization", "0.5",
           "--allowed-local-media-path", os.path.dirname(os.path.abspath(export_dir)),  # the clips are beside it
           "--limit-mm-per-prompt", json.dumps({"video": 1}), "--port", str(PORT)]
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(f"http://localhost:{PORT}/health", timeout=2)
            return server
        except OSError:
            time.sleep(2)
    stop(server)
    raise RuntimeError(f"vllm serve did not answer within 240 s; see {log.name}")


def stop(server):
    os.killpg(server.pid, signal.SIGTERM)  # the server's own session: it and its engine process
    server.wait(timeout=60)


def classify(export_dir, clip, prompt, num_frames):
    """vLLM's raw logits for one clip: the chat cut right after <ACT> (the assistant turn left open)."""
    user, answer = prompt[0]["content"], prompt[1]["content"]
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{clip}"}},
                                             {"type": "text", "text": user.replace("<video>", "", 1)}]},
                {"role": "assistant", "content": answer[: answer.index("<ACT>") + len("<ACT>")]}]
    body = {"model": export_dir, "messages": messages, "continue_final_message": True, "add_generation_prompt": False,
            "use_activation": False, "media_io_kwargs": {"video": {"num_frames": num_frames}}}
    request = urllib.request.Request(f"http://localhost:{PORT}/classify", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["data"][0]["probs"]


def check(name, base, data, work, vllm, args, start):
    checkpoint, export_dir = train_and_export(base, data, work)
    step(f"{name}: trained one step, exported {export_dir}", start)
    videos = sorted(os.path.join(data, "videos", v) for v in os.listdir(os.path.join(data, "videos"))
                    if v.startswith("val_"))[: args.clips]
    reference, items, prompt = actcls_logits(checkpoint, videos)
    bias = torch.tensor(json.load(open(os.path.join(export_dir, "actcls.json")))["score_bias"])
    clips = [lossless_clip(item, os.path.join(work, f"clip_{i}.mkv")) for i, item in enumerate(items)]
    with open(os.path.join(work, "vllm.log"), "w") as log:
        server = serve(vllm, export_dir, log)
        step(f"{name}: vllm serve is up", start)
        try:
            got = torch.tensor([classify(export_dir, c, prompt, len(it.indices)) for c, it in zip(clips, items)])
        finally:
            stop(server)
    logits = got + bias
    diff = (logits - reference).abs().max().item()
    prob = (logits.softmax(-1) - reference.softmax(-1)).abs().max().item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).tolist()
    print(f"{name}: {len(clips)} clips, max |vLLM logits + score_bias - actcls| {diff:.3g} (logits up to "
          f"{reference.abs().max().item():.3g}), max |probability difference| {prob:.3g}, top-1 agrees on "
          f"{sum(agree)}/{len(agree)}", flush=True)
    return all(agree)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm", default=None, help="vLLM version to install (default: the newest)")
    p.add_argument("--wheels", default=None, help="install from this folder of wheels, offline")
    p.add_argument("--layers", type=int, default=4, help="language layers of the real-size model (3B: 36)")
    p.add_argument("--vision-depth", type=int, default=4, help="vision blocks of the real-size model (3B: 32)")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    args = p.parse_args(argv)
    start, work = time.time(), args.work or tempfile.mkdtemp(prefix="vllm-check-")
    vllm = install_vllm(os.path.join(work, "vllm-venv"), args.vllm, args.wheels)
    step("vLLM installed", start)
    data = os.path.join(work, "data")
    make_synthetic(["--out", data, "--train", "4", "--val", str(args.clips), "--size", "112", "--frames", "16",
                    "--fps", "8", "--workers", "1"])
    models = {"tiny": lambda out: write_tiny_model(out, seed=0),
              "real-size": lambda out: real_size_model(out, args.layers, args.vision_depth)}
    results = {}
    for name, build in models.items():
        folder = os.path.join(work, name)
        os.makedirs(folder)
        try:
            results[name] = check(name, build(os.path.join(folder, "base")), data, folder, vllm, args, start)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:  # report it, go on to the next model
            print(f"{name}: FAILED: {e}", flush=True)
            results[name] = False
    step(f"done: {results}", start)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
