"""Video decoding speed: LLaMA-Factory's way against video.decode_frames, and full sample preparation.

    python bench/decode.py                          # 20 clips of each kind, N = 8, 16, 32 frames
    python bench/decode.py --clips 10 --frames 16   # shorter
    python bench/decode.py --max-pixels 65536       # another pixel budget (default: UCF101's 16384)
    python bench/decode.py --loader configs/synthetic.yaml --batches 20   # DataLoader batches/s, workers 0 and 2

Clips (generated into a temp dir, textured content that pans, plus a moving disc):
  avi   UCF101-like: 320x240, 25 fps, 4-12 s, MPEG-4 Part 2 in AVI (prepare.synthetic.write_video: fixed
        quantiser 3, GOP 12, no B-frames)
  webm  SSv2-like: 426x240, 12 fps, 2-6 s, VP9 in WebM (one keyframe per clip, so nearly every frame
        must be decoded whatever the method)

Each clip's N frame indices are the evaluation ones (segment centres) and its target size is
frame_size(info, min_pixels, max_pixels), the same for every method. Methods, in clips per second:
  baseline      LLaMA-Factory's mm_plugin: decode every frame of the clip with PyAV, `frame.to_image()`
                the sampled ones, PIL-resize them to the target size. Indices are handed to it, so it
                pays no probing (LLaMA-Factory reads the header's frame count, which WebM lacks).
  decode        video.load_clip: one open that counts the frames, picks the indices and decodes just
                those, scaled inside FFmpeg's converter (what VideoDataset does without a cache).
  prep base     baseline + the Qwen processor (text + video -> model-ready tensors), called the way
                LLaMA-Factory calls it: a list of PIL frames, processor resize on.
  prep ours     decode + data.Collator (the processor on the uint8 array, resize off), as training runs.
  floor         what no exact method can go below: open the clip and decode only the packets that
                decode_frames must decode (each wanted frame's run from its keyframe, B-frames skipped),
                converting nothing. `prep ceiling` = prep base time / floor time: the full-preparation
                ratio a method would reach if RGB conversion, scaling, the processor and tokenizing cost
                nothing at all.
  cache         the cache-hit path of VideoDataset.__getitem__: video.cached_clip (a memory-mapped
                file of every frame, already scaled) + picking the N frames; the cache is filled first,
                untimed.
Frame folders (the second table): every clip's frames, decoded once, written as a folder of JPEGs
(quality 95, PIL's default 4:2:0 chroma, as frame extraction tools write them) and one of PNGs, read by
video.load_clip as training reads them (fps given), against the same clip as a video (`decode`):
  jpg dir       JPEG folder: DCT scaling (Image.draft) where the budget is at most half the frame size
  jpg full      the same frames decoded at full size, then scaled (what jpg dir would cost without it)
  png dir       PNG folder
Each round runs every method on each clip in turn; a method's time on a clip is its best round, and
clips/s = clips / the sum of those. Time is this process's CPU time by default: every method runs on
one thread (decoders, scaler, torch), as in a DataLoader worker, so CPU seconds are the seconds it
would take on a core of its own, and other jobs on a shared machine do not leak into the ratios.
`--wall` times with the wall clock instead.
"""

import argparse
import os
import sys
import tempfile
import time

import av
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import data  # noqa: E402
import loaders  # noqa: E402
import video  # noqa: E402
from config import video_settings  # noqa: E402
import batch_plan  # noqa: E402
from batch_plan import StepLayout  # noqa: E402
from llamafactory import parse_config  # noqa: E402
from model import ACT_TOKEN, vision_geometry  # noqa: E402
from prepare.records import DEFAULT_MESSAGES as MESSAGES  # noqa: E402
from prepare.synthetic import textured_clip, write_video  # noqa: E402
from prepare.tiny_model import build_processor  # noqa: E402

KINDS = {"avi": (".avi", 25, 240, 320, (4, 12)), "webm": (".webm", 12, 240, 426, (2, 6))}


def make_clips(root, kind, count, seed):
    ext, fps, height, width, (short, long) = KINDS[kind]
    rng = np.random.default_rng([seed, len(kind)])
    paths = []
    for i in range(count):
        seconds = rng.uniform(short, long)
        path = os.path.join(root, f"{kind}_{i:03d}{ext}")
        write_video(path, textured_clip(rng, round(seconds * fps), height, width), fps)
        paths.append(path)
    return paths


def baseline_frames(path, indices, size):
    """LLaMA-Factory's _regularize_videos + _preprocess_image, with the target size given."""
    height, width = size
    frames = []
    with av.open(path, "r") as container:
        stream = next(s for s in container.streams if s.type == "video")
        container.seek(0)
        for frame_idx, frame in enumerate(container.decode(stream)):
            if frame_idx in indices:
                frames.append(frame.to_image())
    return [image.resize((width, height)) for image in frames]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=20, help="clips of each kind")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32], help="N, frames sampled per clip")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the clips per method")
    p.add_argument("--max-pixels", type=int, default=128 * 128, help="video_max_pixels (UCF101 config: 16384)")
    p.add_argument("--min-pixels", type=int, default=56 * 56, help="video_min_pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wall", action="store_true", help="wall-clock time instead of this process's CPU time")
    p.add_argument("--loader", metavar="CONFIG", help="instead: time train.py's DataLoader on CONFIG's training set")
    p.add_argument("--batches", type=int, default=20, help="--loader: batches to time per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--loader: dataloader_num_workers values")
    args = p.parse_args(argv)
    if args.loader:
        return time_loader(args)
    clock = time.perf_counter if args.wall else time.process_time

    import torch
    from transformers.video_utils import VideoMetadata
    torch.set_num_threads(1)  # one DataLoader worker's share
    processor = build_processor(args.min_pixels, args.max_pixels)
    processor.tokenizer.add_special_tokens({"extra_special_tokens": [ACT_TOKEN]}, replace_extra_special_tokens=False)
    collate = data.Collator(processor, processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN))
    budget = (args.min_pixels, args.max_pixels)

    with tempfile.TemporaryDirectory(prefix="actcls-bench-") as root:
        t0 = time.time()
        clips = {kind: make_clips(root, kind, args.clips, args.seed) for kind in KINDS}
        infos = {kind: [video.probe_video(c) for c in clips[kind]] for kind in KINDS}
        cache = os.path.join(root, "cache")
        for kind in KINDS:
            for c in clips[kind]:
                video.cached_clip(c, cache, *budget)
        frames_total = {k: sum(i.num_frames for i in infos[k]) for k in KINDS}
        folders = {kind: {ext: [frame_folder(c, ext) for c in clips[kind]] for ext in ("jpg", "png")} for kind in KINDS}
        print(f"{args.clips} clips of each kind in {time.time() - t0:.0f}s: "
              + ", ".join(f"{k} {infos[k][0].width}x{infos[k][0].height} -> "
                          f"{'x'.join(map(str, video.frame_size(infos[k][0], *budget)))}, "
                          f"{frames_total[k] / args.clips:.0f} frames a clip on average" for k in KINDS)
              + f"; budget {args.min_pixels}..{args.max_pixels} pixels; best of {args.rounds} rounds\n")

        rows = []
        for n in args.frames:
            for kind in KINDS:
                paths, kind_infos = clips[kind], infos[kind]
                plan = [(path, video.sample_indices(info.num_frames, n), video.frame_size(info, *budget))
                        for path, info in zip(paths, kind_infos)]

                def decode_ours(path, indices):
                    return video.load_clip(path, lambda info: indices, lambda info: video.frame_size(info, *budget))

                def baseline(path, indices, size, info):
                    baseline_frames(path, indices, size)

                def decode(path, indices, size, info):
                    decode_ours(path, indices)

                def prep_base(path, indices, size, info):
                    frames = baseline_frames(path, indices, size)
                    meta = VideoMetadata(total_num_frames=info.num_frames, fps=info.fps,
                                         frames_indices=indices.tolist())
                    processor(text=[data.prompt_text(processor, MESSAGES)], videos=[frames], video_metadata=[meta],
                              do_sample_frames=False, padding=True, return_tensors="pt")

                def prep_ours(path, indices, size, info):
                    info, indices, frames = decode_ours(path, indices)
                    collate([data.Item(data.Sample(path, MESSAGES, 0, "default", "bench"), frames, indices, info, 0,
                                       True, [])])

                def floor(path, indices, size, info):
                    with video._VideoFile(path) as opened:
                        assert opened._decode_runs(set(indices.tolist()), lambda frame: None) is not None

                def cache_read(path, indices, size, info):
                    info, clip = video.cached_clip(path, cache, *budget)
                    np.ascontiguousarray(clip[video.sample_indices(info.num_frames, n)])

                def folder_reader(ext, read=None):
                    def run(path, indices, size, info):
                        folder = folders[kind][ext][paths.index(path)]
                        if read is None:
                            video.load_clip(folder, lambda info: indices, lambda info: video.frame_size(info, *budget),
                                            info.fps)
                        else:
                            files = video.frame_files(folder)
                            [read(files[i], size) for i in indices]
                    return run

                methods = {"baseline": baseline, "decode": decode, "prep base": prep_base,
                           "prep ours": prep_ours, "floor": floor, "cache": cache_read,
                           "jpg dir": folder_reader("jpg"), "jpg full": folder_reader("jpg", read_without_draft),
                           "png dir": folder_reader("png")}
                check_same_inputs(plan[0], kind_infos[0], processor, collate, decode_ours)
                # best[method][clip]: the fastest of the rounds; methods interleave clip by clip, so a
                # busy moment on the shared machine hits them alike
                best = {name: [float("inf")] * len(plan) for name in methods}
                for _ in range(args.rounds):
                    for c, ((path, indices, size), info) in enumerate(zip(plan, kind_infos)):
                        for name, fn in methods.items():
                            t = clock()
                            fn(path, indices, size, info)
                            best[name][c] = min(best[name][c], clock() - t)
                rows.append((kind, n, {name: len(plan) / sum(best[name]) for name in methods}))

    header = (f"{'clips':<5} {'N':>3} | {'baseline':>8} {'decode':>8} {'ratio':>6} | {'prep base':>9} "
              f"{'prep ours':>9} {'ratio':>6} | {'floor':>8} {'prep ceiling':>12} | {'cache':>8} {'ratio':>6}")
    print(f"clips per {'wall-clock' if args.wall else 'CPU'} second (one process, one thread); ratio = ours / baseline")
    print(header)
    print("-" * len(header))
    for kind, n, r in rows:
        print(f"{kind:<5} {n:>3} | {r['baseline']:>8.1f} {r['decode']:>8.1f} {r['decode'] / r['baseline']:>5.2f}x | "
              f"{r['prep base']:>9.1f} {r['prep ours']:>9.1f} {r['prep ours'] / r['prep base']:>5.2f}x | "
              f"{r['floor']:>8.1f} {r['floor'] / r['prep base']:>11.2f}x | "
              f"{r['cache']:>8.0f} {r['cache'] / r['baseline']:>5.1f}x")
    header = (f"{'clips':<5} {'N':>3} | {'decode':>8} | {'jpg dir':>8} {'ratio':>6} | {'jpg full':>8} {'ratio':>6} | "
              f"{'png dir':>8} {'ratio':>6}")
    print(f"\nframe folders of the same clips, clips per {'wall-clock' if args.wall else 'CPU'} second; "
          f"ratio = folder / the video file (decode)")
    print(header)
    print("-" * len(header))
    for kind, n, r in rows:
        print(f"{kind:<5} {n:>3} | {r['decode']:>8.1f} | " + " | ".join(
            f"{r[m]:>8.1f} {r[m] / r['decode']:>5.2f}x" for m in ("jpg dir", "jpg full", "png dir")))


def frame_folder(path, ext):
    """Every frame of the clip as img_00001.<ext> ... in a folder beside it."""
    folder = f"{path}_{ext}"
    os.makedirs(folder)
    for i, frame in enumerate(video.decode_frames(path, range(video.probe_video(path).num_frames))):
        Image.fromarray(frame).save(os.path.join(folder, f"img_{i + 1:05d}.{ext}"), **({"quality": 95} if ext == "jpg" else {}))
    return folder


def read_without_draft(file, size):
    """video.read_frame without the DCT scaling: decode whole, then the same swscale bicubic."""
    with Image.open(file) as image:
        rgb = np.asarray(image.convert("RGB"))
    return video._Converter(size)(av.VideoFrame.from_ndarray(rgb, format="rgb24"))


def time_loader(args):
    """Wall-clock batches/s of train.py's training DataLoader (its dataset, Collator and batch order)
    for each worker count, without and with a (pre-filled) frame cache. Compare with the demo's step
    time (runs/<name>/metrics.jsonl: elapsed_s / step) to see whether training waits on data."""
    import dataclasses

    from model import load_processor
    cfg = parse_config(["--config", args.loader])
    processor, act_id = load_processor(cfg.model_name_or_path, cfg.trust_remote_code)
    collate = data.Collator(processor, act_id)
    with tempfile.TemporaryDirectory(prefix="actcls-loader-") as cache:
        print(f"{args.loader}: batch {cfg.per_device_train_batch_size}, video_fps {cfg.video_fps}, "
              f"maxlen {cfg.video_maxlen}, budget {cfg.video_min_pixels}..{cfg.video_max_pixels}; "
              f"{args.batches} batches after the first (wall clock)")
        for cache_dir in (None, cache):
            cfg = dataclasses.replace(cfg, video_cache_dir=cache_dir)
            mix = data.load_datasets(cfg.train_datasets, {"default": cfg.num_action_classes},
                                     video_settings(cfg, vision_geometry(processor)),
                                     cfg.max_bad_video_fraction, cfg.seed)
            dataset = mix.dataset
            batches = batch_plan.train_batches(mix.counts, mix.weights, StepLayout(cfg.per_device_train_batch_size, 1, 1, 0), 0,
                                         cfg.seed)
            batches = batches[:args.batches + 1]
            if cache_dir is not None:  # fill it, untimed: the second epoch onwards
                for key in {k for b in batches for k in b}:
                    dataset[key]
            for workers in args.workers:
                loader = loaders.make_loader(dataset, batches, collate, workers, cfg.seed)
                t0 = time.perf_counter()
                it = iter(loader)
                next(it)
                t1 = time.perf_counter()
                count = sum(1 for _ in it)
                t2 = time.perf_counter()
                print(f"  cache {'on ' if cache_dir else 'off'}  workers {workers}: first batch {t1 - t0:5.2f} s, then "
                      f"{count / (t2 - t1):6.1f} batches/s ({(t2 - t1) / count * 1000:.0f} ms a batch, "
                      f"{count * cfg.per_device_train_batch_size / (t2 - t1):.0f} clips/s)")


def check_same_inputs(item, info, processor, collate, decode_ours):
    """Both preparations give the model the same tensor shapes (same grid, same token count)."""
    from transformers.video_utils import VideoMetadata
    path, indices, size = item
    meta = VideoMetadata(total_num_frames=info.num_frames, fps=info.fps, frames_indices=indices.tolist())
    base = processor(text=[data.prompt_text(processor, MESSAGES)], videos=[baseline_frames(path, indices, size)],
                     video_metadata=[meta], do_sample_frames=False, padding=True, return_tensors="pt")
    info, indices, frames = decode_ours(path, indices)
    ours = collate([data.Item(data.Sample(path, MESSAGES, 0, "default", "bench"), frames, indices, info, 0, True,
                              [])]).inputs
    assert base["video_grid_thw"].tolist() == ours["video_grid_thw"].tolist()
    assert base["input_ids"].shape == ours["input_ids"].shape
    import torch
    assert torch.as_tensor(base["second_per_grid_ts"]).tolist() == torch.as_tensor(ours["second_per_grid_ts"]).tolist()


if __name__ == "__main__":
    main()
