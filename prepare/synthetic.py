"""Generate a small synthetic action dataset of real video files (demo and tests).

Usage (from the repo root):
    python prepare/synthetic.py                       # 600 train + 120 val clips in data/synthetic
    python prepare/synthetic.py --out /tmp/synth --train 60 --val 12 --size 64 --workers 2

Writes, under --out:
    videos/train_00000.mp4, videos/train_00001.avi, videos/train_00002.webm, ...  (containers round-robin)
    classes.json            ["move_left", "move_right", "move_up", "move_down", "grow", "shrink"]
    val.jsonl, train.jsonl  one sharegpt record per clip (prepare/records.py, the fixed phrasing), video
                            paths relative to --out

The jsonl files are written last (temp file + os.replace) and any old ones are removed first, so a
folder with both jsonl files is a finished run. The same --seed gives byte-identical jsonl files and
videos (encoders run single-threaded, muxers bitexact).

Library use: `make_clip(label, rng, size, frames)` draws one clip as a (T, H, W, 3) uint8 array without
encoding it; `write_video(path, frames, fps)` encodes frames to .mp4 (H.264, B-frames), .avi (MPEG-4
Part 2) or .webm (VP9), picked by the extension. Other tests use it to make fixture videos.
"""

# Why the data looks like this.
# The demo trains a randomly initialised tiny Qwen2.5-VL: its vision tower has no learned features, so
# it can only pick up signals that are large and consistent in raw pixel space. It was measured that
# objects must be bright WHITE (one contrast polarity, always far above the background) on darker
# textured random backgrounds (brightness <= 140); objects of random colours are not learned in a few
# minutes. The texture and the slow background drift keep "find the brightest blob" from being trivial.
# The classes differ ONLY in motion: every clip draws its background, shape, orientation, tint, size and
# start position from the same class-independent distributions, so the FIRST frame of a clip is at
# chance (tests/test_synthetic.py checks this) and the model must compare frames.
# Caveat: an object that stays in a bounded frame while moving 35-60% of the frame cannot have the same
# position distribution in every frame for "left" and "right" (their mean displacements differ), so
# later frames do reveal the class through position (from about mid-clip on, x alone separates left
# from right). We chose the first frame to be the uninformative one, as the demo's spec asks.
# Motion is large (translation by 35-60% of the frame, size change by 2-3x) so it survives the training
# sampler (8 of the 16 frames, resized to 112 px) and lossy encoding.

import argparse
import os
import sys
import time
from fractions import Fraction
from multiprocessing import Pool
from pathlib import Path

import av
import numpy as np

# make `prepare.records` importable both as `python prepare/synthetic.py` and as `import prepare.synthetic`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.records import make_record, write_classes, write_jsonl  # noqa: E402

CLASSES = ["move_left", "move_right", "move_up", "move_down", "grow", "shrink"]
DIRECTIONS = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}  # label -> (dx, dy), image y points down
SHAPES = ["circle", "ring", "square", "triangle", "cross"]
CONTAINERS = [".mp4", ".avi", ".webm"]  # round-robin over clips

# Geometry, in fractions of the frame size S.
RADIUS = (0.09, 0.15)  # object "radius" (circumradius-ish) at the first frame
START = (0.39, 0.61)  # first-frame centre, x and y, for every class
EDGE = 0.04  # the centre stays within [EDGE, 1 - EDGE]: the object stays mostly in frame
SHIFT = (0.35, 0.60)  # translation over the clip
SCALE = (2.0, 3.0)  # size factor over the clip (grow: x k, shrink: / k)
MAX_RADIUS, MIN_RADIUS = 0.42, 0.04  # bounds on the last frame's radius for grow / shrink
BG_MAX = 140  # background brightness ceiling; objects are >= 215


# -----------------------------------------------------------------------------
# drawing


def _resize_bilinear(grid: np.ndarray, out: int) -> np.ndarray:
    """(k, k, C) -> (out, out, C), bilinear, corners aligned."""
    k = grid.shape[0]
    c = np.linspace(0, k - 1, out)
    i = np.clip(np.floor(c).astype(int), 0, k - 2)
    f = (c - i)[:, None, None]
    rows = grid[i] * (1 - f) + grid[i + 1] * f  # (out, k, C)
    return rows[:, i] * (1 - f[None, :, :, 0]) + rows[:, i + 1] * f[None, :, :, 0]


def _background(rng: np.random.Generator, S: int, T: int) -> np.ndarray:
    """(T, S, S, 3) uint8: a dark-mid low-frequency colour field plus stripes / checker / blotches,
    brightness <= BG_MAX, sometimes drifting slowly (crop window moving over a larger canvas)."""
    pad = max(S // 10, 1)
    W = S + 2 * pad
    k = int(rng.integers(3, 7))
    field = _resize_bilinear(rng.uniform(15, 105, size=(k, k, 3)), W)
    yy, xx = np.mgrid[0:W, 0:W].astype(np.float32)
    kind = int(rng.integers(3))
    amp = rng.uniform(12, 30)
    if kind == 0:  # stripes at a random angle and period
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2) * S
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        field += amp * wave[..., None] * rng.uniform(0.5, 1.0, size=3)
    elif kind == 1:  # checkerboard with a random cell size
        cell = rng.uniform(0.06, 0.16) * S
        board = ((xx // cell + yy // cell) % 2) * 2 - 1
        field += amp * board[..., None] * rng.uniform(0.5, 1.0, size=3)
    else:  # higher-frequency colour blotches
        k2 = int(rng.integers(8, 16))
        field += _resize_bilinear(rng.uniform(-amp, amp, size=(k2, k2, 3)), W)
    field += rng.normal(0, 3, size=(W, W, 1))  # fine static grain, same in every frame
    canvas = np.clip(field, 0, BG_MAX).astype(np.uint8)

    # drift: half of the clips pan by up to `pad` pixels over the clip, in a random direction
    drift = rng.uniform(0, pad) if rng.random() < 0.5 else 0.0
    angle = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 1, T)
    ox = np.rint(pad + drift * np.cos(angle) * t).astype(int)
    oy = np.rint(pad + drift * np.sin(angle) * t).astype(int)
    return np.stack([canvas[y:y + S, x:x + S] for x, y in zip(ox, oy)])


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in its own frame: (u, v) are pixel offsets divided by the radius."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, inscribed in the unit circle, one vertex at v = -1
        return (v <= 0.5) & (np.sqrt(3) * u - v <= 1.0) & (-np.sqrt(3) * u - v <= 1.0)
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 1.0) & (b <= 0.33)) | ((b <= 1.0) & (a <= 0.33))
    raise ValueError(f"unknown shape {shape!r}")


def make_clip(label: int, rng: np.random.Generator, size: int = 128, frames: int = 16) -> np.ndarray:
    """Draw one clip of class `label` as a (frames, size, size, 3) uint8 RGB array.

    Everything visible in the first frame (background, shape, angle, tint, size, position) is drawn
    from class-independent distributions; only the motion over the clip depends on the label."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    if frames < 2:
        raise ValueError(f"need at least 2 frames to show motion, got {frames}")
    S, T = size, frames
    # class-independent draws
    video = _background(rng, S, T)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    angle = rng.uniform(0, 2 * np.pi)
    white = rng.uniform(235, 255)
    color = np.clip(white - rng.uniform(0, 20, size=3), 215, 255).astype(np.uint8)  # slight tint
    r0 = rng.uniform(*RADIUS) * S
    x0, y0 = rng.uniform(*START, size=2) * S

    # the motion, the only thing that depends on the label
    t = np.linspace(0, 1, T)  # clip time, 0 at the first frame and 1 at the last
    if label in DIRECTIONS:
        dx, dy = DIRECTIONS[label]
        start = x0 if dx else y0
        room = start - EDGE * S if (dx + dy) < 0 else (1 - EDGE) * S - start  # >= SHIFT[0] * S
        shift = rng.uniform(SHIFT[0] * S, min(SHIFT[1] * S, room))
        cx, cy, r = x0 + dx * shift * t, y0 + dy * shift * t, np.full(T, r0)
    else:
        grow = CLASSES[label] == "grow"
        k_max = MAX_RADIUS * S / r0 if grow else r0 / (MIN_RADIUS * S)
        k = rng.uniform(SCALE[0], min(SCALE[1], k_max))
        r = r0 * k ** (t if grow else -t)  # constant ratio per frame, like a zoom
        cx, cy = np.full(T, x0), np.full(T, y0)

    # pixel centres, rotated into each frame's object coordinates
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    c, s = np.cos(angle), np.sin(angle)
    for i in range(T):
        px, py = xx - cx[i], yy - cy[i]
        u = (c * px + s * py) / r[i]
        v = (-s * px + c * py) / r[i]
        video[i][_shape_mask(shape, u, v)] = color
    return video


# -----------------------------------------------------------------------------
# encoding

# extension -> (codec, stream options). Cheap settings: these clips are tiny and must encode fast on
# 2 CPU cores, but at quality high enough that a white object keeps a crisp edge.
CODECS = {
    ".mp4": ("libx264", {"preset": "veryfast", "crf": "18", "bf": "2"}),  # B-frames on purpose
    ".avi": ("mpeg4", {"flags": "+qscale", "global_quality": str(3 * 118)}),  # fixed q=3 (-q:v 3)
    ".webm": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "20",
                             "b": "0", "lag-in-frames": "0"}),
}


def textured_clip(rng, num_frames, height, width):
    """Camera-like content for decoder tests and benchmarks (not the dataset): a smooth colour field
    with fine detail that pans, and a bright disc crossing it."""
    k = 24
    field = np.kron(rng.uniform(30, 200, (height // k + 12, width // k + 12, 3)), np.ones((k, k, 1)))
    field = (field + np.roll(field, k // 2, 0) + np.roll(field, k // 2, 1) + np.roll(field, k // 2, (0, 1))) / 4
    field = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        oy, ox = int(t * 0.7) % (field.shape[0] - height), int(t * 1.3) % (field.shape[1] - width)
        out[t] = field[oy:oy + height, ox:ox + width]
        cx, cy = width * (0.2 + 0.6 * t / num_frames), height / 2 + height / 6 * np.sin(t / 10)
        out[t][(xx - cx) ** 2 + (yy - cy) ** 2 < (height / 12) ** 2] = 250
    return out


def write_video(path, frames, fps=8) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames to `path`; the codec follows the extension
    (.mp4 -> H.264 with B-frames, .avi -> MPEG-4 Part 2, .webm -> VP9), pix_fmt yuv420p.

    H and W must be even (yuv420p). Every frame ends up in the file: each frame gets pts = its index
    in a 1/fps time base and the encoder is flushed before the container is closed."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in CODECS:
        raise ValueError(f"unsupported video extension {ext!r} for {path}; use one of {sorted(CODECS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {H}x{W}")
    rate = Fraction(fps).limit_denominator(1001)
    codec, options = CODECS[ext]
    # bitexact: no random segment UID / date / version string, so the same frames give the same bytes
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.thread_count = 1  # parallelism comes from the worker pool; also keeps output deterministic
        stream.options = dict(options)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush: B-frames / lookahead hold frames back


# -----------------------------------------------------------------------------
# dataset


def _split_labels(n: int, seed: int, split_id: int) -> list[int]:
    """Balanced labels (cycle through the classes), shuffled reproducibly."""
    labels = np.arange(n) % len(CLASSES)
    return np.random.default_rng([seed, split_id, 0]).permutation(labels).tolist()


def _make_one(job: tuple) -> str:
    """Worker: draw and encode one clip (writes to a temp name, then renames)."""
    out, name, label, seed, split_id, index, size, frames, fps, first_frame_only = job
    rng = np.random.default_rng([seed, split_id, 1, index])  # per clip: independent of worker order
    final = Path(out) / name
    tmp = final.with_name(f".tmp_{final.name}")  # keep the extension: it picks the muxer
    clip = make_clip(label, rng, size, frames)
    if first_frame_only:  # the same clips, frozen on their first frame: the motion is gone
        clip = np.repeat(clip[:1], len(clip), axis=0)
    write_video(tmp, clip, fps)
    os.replace(tmp, final)
    return name


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/synthetic", help="output folder (relative to the current dir)")
    p.add_argument("--train", type=int, default=600, help="number of training clips")
    p.add_argument("--val", type=int, default=120, help="number of validation clips")
    p.add_argument("--size", type=int, default=128, help="frame height and width in pixels (even)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the written videos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="encoding processes (1 = no pool)")
    p.add_argument("--first-frame-only", action="store_true",
                   help="every clip shows only its first frame (a control: a model must sit at chance)")
    args = p.parse_args(argv)
    problems = [
        *(["--train and --val must be >= 0"] if min(args.train, args.val) < 0 else []),
        *(["--size must be even and >= 16"] if args.size < 16 or args.size % 2 else []),
        *(["--frames must be >= 2"] if args.frames < 2 else []),
        *(["--fps must be >= 1"] if args.fps < 1 else []),
        *(["--workers must be >= 1"] if args.workers < 1 else []),
    ]
    if problems:
        p.error("; ".join(problems))

    t0 = time.time()
    out = Path(args.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # an interrupted run must not look finished
        (out / f"{split}.jsonl").unlink(missing_ok=True)

    jobs, records = [], {}
    for split_id, (split, n) in enumerate([("train", args.train), ("val", args.val)]):
        records[split] = []
        for i, label in enumerate(_split_labels(n, args.seed, split_id)):
            name = f"videos/{split}_{i:05d}{CONTAINERS[i % len(CONTAINERS)]}"
            jobs.append((str(out), name, label, args.seed, split_id, i, args.size, args.frames, args.fps,
                         args.first_frame_only))
            records[split].append(make_record(name, label))  # the fixed phrasing

    if args.workers > 1 and len(jobs) > 1:
        with Pool(args.workers) as pool:
            for _ in pool.imap_unordered(_make_one, jobs, chunksize=8):
                pass
    else:
        for job in jobs:
            _make_one(job)

    write_classes(out / "classes.json", CLASSES)
    for split in ("val", "train"):  # train.jsonl last: its presence marks a finished run
        write_jsonl(out / f"{split}.jsonl", records[split])
    print(f"wrote {args.train} train + {args.val} val clips ({args.size}px, {args.frames} frames @ "
          f"{args.fps} fps) to {out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
