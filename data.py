"""Records -> validated samples -> sampled, decoded, resized frames -> model-ready batches.

Record format (LLaMA-Factory sharegpt, a .json array or .jsonl lines):
    {"messages": [{"role": "user", "content": "<video>What action is being performed in this video?"},
                  {"role": "assistant", "content": "The action being performed is <ACT>."}],
     "videos": ["UCF101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"], "action_label": 0}
A relative video path resolves against the dataset's `video_root`, else the record file's folder.
"""

import contextlib
import hashlib
import json
import math
import os
import secrets
import signal
import threading
import warnings
from dataclasses import asdict, dataclass

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter

from model import ACT_TOKEN

VIDEO_TOKEN = "<video>"


# ---------------------------------------------------------------------------------------------------
# Records

@dataclass
class Sample:
    video: str  # absolute path
    messages: list  # [{"role", "content"}], content with <video> and <ACT> placeholders
    label: int | None
    label_space: str
    source: str  # "file:line" for error messages


class DataError(ValueError):
    pass


def read_records(path):
    """Yields (line_number, record). `.jsonl`: one object a line; `.json`: an array (line numbers
    are then the record's index + 1, since json does not keep positions)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file not found (check `path` in train_datasets/eval_datasets)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: dataset file is empty")
    if path.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); use a JSON array or .jsonl lines") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
        yield from enumerate(records, 1)


def record_problems(record, num_classes, require_label):
    """Everything wrong with one record, as short phrases (empty list: the record is fine)."""
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, expected an object"]
    problems = []
    messages, videos = record.get("messages"), record.get("videos")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        problems.append("`messages` must be a list of {role, content} objects")
        messages = []
    user = "".join(m["content"] for m in messages if m.get("role") == "user")
    assistant = "".join(m["content"] for m in messages if m.get("role") == "assistant")
    if user.count(VIDEO_TOKEN) != 1:
        problems.append(f"the user turn must contain {VIDEO_TOKEN} exactly once (found {user.count(VIDEO_TOKEN)})")
    if assistant.count(ACT_TOKEN) != 1:
        problems.append(f"the assistant turn must contain {ACT_TOKEN} exactly once (found {assistant.count(ACT_TOKEN)})")
    if not (isinstance(videos, list) and len(videos) == 1 and isinstance(videos[0], str)):
        problems.append("`videos` must be a list with exactly one path")
    label = record.get("action_label")
    if label is None:
        if require_label:
            problems.append("`action_label` is missing")
    elif isinstance(label, bool) or not isinstance(label, int):
        problems.append(f"`action_label` must be an int, got {label!r}")
    elif not 0 <= label < num_classes:
        problems.append(f"`action_label` {label} is outside [0, {num_classes}) (num_action_classes={num_classes})")
    return problems


def resolve_video(path, video_root, record_file):
    if os.path.isabs(path):
        return path
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(record_file))
    return os.path.join(root, path)


def load_samples(path, video_root, num_classes, label_space="default", require_label=True, max_report=20):
    """Reads and validates a whole dataset file up front, so a bad record fails the run before any
    GPU time is spent. All problems are collected and reported together, with file:line.

    Returns (samples, bad_videos): records whose video file is missing or empty are not errors here
    but listed in bad_videos, so the caller can apply its tolerance (max_bad_video_fraction)."""
    samples, problems, bad_videos = [], [], []
    for lineno, record in read_records(path):
        where = f"{path}:{lineno}"
        found = record_problems(record, num_classes, require_label)
        problems += [f"{where}: {p}" for p in found]
        if found:
            continue
        video = resolve_video(record["videos"][0], video_root, path)
        if not os.path.isfile(video):
            bad_videos.append(f"{where}: video {video} not found")
        elif os.path.getsize(video) == 0:
            bad_videos.append(f"{where}: video {video} is empty (0 bytes)")
        else:
            samples.append(Sample(video, record["messages"], record.get("action_label"), label_space, where))
    if problems:
        more = f"\n... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems[:max_report]) + more)
    if not samples and not bad_videos:
        raise DataError(f"{path}: no records")
    return samples, bad_videos


def check_bad_videos(bad_videos, total, max_fraction, max_report=20):
    """Fails when more than max_fraction of the samples have unusable videos (a wrong video_root
    makes them all missing); otherwise returns a warning listing them (or None)."""
    if not bad_videos:
        return None
    listing = "\n".join(bad_videos[:max_report]) + (f"\n... and {len(bad_videos) - max_report} more"
                                                    if len(bad_videos) > max_report else "")
    summary = f"{len(bad_videos)} of {total} samples have unusable videos ({len(bad_videos) / total:.1%})"
    if len(bad_videos) > max_fraction * total:
        raise DataError(f"{summary}, more than max_bad_video_fraction={max_fraction}:\n{listing}\n"
                        f"Check `video_root` (relative paths resolve against it, else the record file's folder).")
    return f"skipping them: {summary}:\n{listing}"


# ---------------------------------------------------------------------------------------------------
# Video: probe, choose frame indices, decode exactly those frames
#
# Frame i of a video is the i-th frame a full decode outputs (presentation order). How decoding stays
# exact while decoding and converting as little as possible (numbers from bench/decode.py, this machine):
# - One demux pass (no decoding) reads every packet into memory: the frame count (WebM/MKV headers have
#   none), the keyframes, and the presentation order, as the rank of each packet's pts.
# - The decoder is fed from those packets, starting at the last keyframe before each wanted frame, so
#   nothing depends on container seeks (naive seeking returns wrong frames on B-frame AVI). Decoded
#   frames are identified by pts; on any surprise (missing or repeated timestamps, a run that does not
#   start on a keyframe, a wanted frame that never came out) the whole clip is decoded in order instead.
# - Frames nobody asked for are not converted, and those that nothing refers to (B-frames) not even
#   decoded (skip_frame NONREF). Wanted frames go from YUV straight to RGB at the target size in one
#   swscale call that reuses one scaler context (`frame.reformat` builds a new one per frame: ~4x slower).
# - Tried and left out: MPEG-4 `lowres` decoding (slower than full size at 320x240 here: its C code
#   loses to the SIMD paths); decoder threads (DataLoader workers already use the cores, and frame
#   threads add delay).
# - Cost of the in-memory packets: one file's compressed bytes while it is decoded (~1 MB for a UCF101
#   clip). Fine for action clips; hour-long files would want container seeks with the same checks.

# decoders of codecs without frame reordering (no B-frames): probing has nothing to learn from decoding
_NO_REORDER = ("vp8", "vp9", "av1", "libdav1d", "libaom-av1", "libvpx", "libvpx-vp9")
# Bicubic like the Qwen processor's resize; full-resolution chroma, so colour edges are filtered once
# from the 4:2:0 planes (without these flags the result is about twice as far from the processor's own
# resize of full-size frames).
SCALE_FLAGS = Interpolation.BICUBIC | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def _open(path):
    """av.open, minus the frames avformat_find_stream_info decodes on Matroska/WebM (3 ms of a 4 s
    VP9 clip, 40x the rest of opening it): there only keyframes are decoded while probing. A codec
    that may reorder frames is reopened normally, as probing is how FFmpeg learns its delay."""
    try:
        if path.lower().endswith((".webm", ".mkv")):
            container = av.open(path, options={"skip_frame": "nonkey"})
            streams = container.streams.video
            if streams and streams[0].codec_context.name in _NO_REORDER and streams[0].codec_context.width:
                return container
            container.close()
        return av.open(path)
    except av.FFmpegError as e:
        raise DataError(f"{path}: cannot open video ({e})") from None


class _VideoFile:
    """One open video file: every packet of its first video stream, demuxed into memory, and the
    presentation order of the frames they hold. Use as a context manager."""

    def __init__(self, path):
        self.path = path
        self.container = _open(path)
        try:
            if not self.container.streams.video:
                raise DataError(f"{path}: no video stream")
            self.stream = stream = self.container.streams.video[0]
            stream.codec_context.thread_count = 1  # workers are the parallelism (see above)
            # zero-size packets hold no frame (AVI drop entries, the demuxer's final flush packet)
            self.packets = [p for p in self.container.demux(stream) if p.size > 0]
            if any(p.is_corrupt for p in self.packets):  # a file cut mid-frame: decoding would give garbage
                raise DataError(f"{path}: truncated or corrupt ({sum(p.is_corrupt for p in self.packets)} "
                                f"corrupt packet(s) of {len(self.packets)})")
        except BaseException:
            self.container.close()
            raise
        shown = [d for d, p in enumerate(self.packets) if not p.is_discard]  # edit lists cut the rest
        pts = [self.packets[d].pts for d in shown]
        # order[i]: decode position of frame i; None when timestamps cannot give the order
        self.order = None
        if None not in pts and len(set(pts)) == len(pts):
            self.order = [shown[j] for j in np.argsort(pts, kind="stable")]
        num_frames = len(shown)
        if num_frames == 0:
            self.container.close()
            raise DataError(f"{path}: the video stream holds no frames")
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            fps = float(rate)
        elif self.order is not None and num_frames > 1 and stream.time_base:  # from the timestamps
            span = (self.packets[self.order[-1]].pts - self.packets[self.order[0]].pts) * stream.time_base
            fps = (num_frames - 1) / float(span)
        else:
            fps = 25.0
        ctx = stream.codec_context
        self.info = VideoInfo(num_frames, fps, ctx.width, ctx.height)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def decode(self, indices, size=None):
        """See decode_frames."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        if not indices:
            raise DataError(f"{self.path}: no frame indices to decode")
        n = self.info.num_frames
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise DataError(f"{self.path}: frame index {bad[0]} is out of range: the video has {n} frames "
                            f"(valid indices 0..{n - 1})")
        convert = _Converter(size)
        wanted = set(indices)
        try:
            frames = self._decode_runs(wanted, convert) if self.order is not None else None
            if frames is None:
                frames = self._decode_in_order(wanted, convert)
        except av.FFmpegError as e:
            raise DataError(f"{self.path}: decoding failed ({e})") from None
        return np.stack([frames[i] for i in indices])

    def _runs(self, wanted):
        """[start, end] decode-position runs that yield the wanted frames. A run starts at the last
        keyframe at or before the frame in decode order whose pts is not later than the frame's (so an
        open GOP's leading B-frames, which refer to the GOP before, start one keyframe earlier); runs
        that touch or overlap are merged, so each packet is decoded at most once."""
        packets, needs = self.packets, []
        for i in wanted:
            d = self.order[i]
            k, pts = d, packets[d].pts
            while k > 0 and not (packets[k].is_keyframe and packets[k].pts is not None and packets[k].pts <= pts):
                k -= 1
            needs.append((k, d))
        runs = []
        for k, d in sorted(needs):
            if runs and k <= runs[-1][1] + 1:
                runs[-1][1] = max(runs[-1][1], d)
            else:
                runs.append([k, d])
        return runs

    def _decode_runs(self, wanted, convert):
        """Decode only the runs; frames are matched by pts. None when the decoder's output does not
        match what the packets promised."""
        ctx, packets = self.stream.codec_context, self.packets
        known = {packets[d].pts for d in self.order}
        want = {packets[self.order[i]].pts: i for i in wanted}
        out, skip = {}, None
        for start, end in self._runs(wanted):
            key_pts = packets[start].pts
            for d in range(start, end + 2):
                packet = packets[d] if d <= end else None  # None drains the frames the decoder holds
                if skip != (skip := "DEFAULT" if packet is None or packet.pts in want else "NONREF"):
                    ctx.skip_frame = skip
                for frame in ctx.decode(packet):
                    if frame.pts not in known or (frame.pts == key_pts and not frame.key_frame):
                        ctx.flush_buffers()
                        return None
                    i = want.get(frame.pts)
                    if i is not None and i not in out:
                        out[i] = convert(frame)
            ctx.flush_buffers()  # leaves the drained state; the next run starts at a keyframe
        return out if len(out) == len(wanted) else None

    def _decode_in_order(self, wanted, convert):
        """The definition of the index: decode every packet in order and count the frames."""
        ctx = self.stream.codec_context
        ctx.flush_buffers()
        ctx.skip_frame = "DEFAULT"
        out, count, last = {}, 0, max(wanted)
        for packet in self.packets + [None]:
            for frame in ctx.decode(packet):
                if count in wanted:
                    out[count] = convert(frame)
                count += 1
            if count > last:
                break
        ctx.flush_buffers()
        if len(out) < len(wanted):
            missing = min(wanted - set(out))
            raise DataError(f"{self.path}: frame {missing} could not be decoded (the decoder output {count} "
                            f"frames, the container lists {self.info.num_frames})")
        return out


_reformatters = threading.local()  # one scaler per thread and process, kept across clips (see _Converter)


class _Converter:
    """Decoded frame -> (H, W, 3) uint8 RGB, scaled to `size` = (height, width) in the same swscale
    call. The scaler context is kept from clip to clip (rebuilt only when sizes or formats change):
    building one costs about as much as converting 10 frames."""

    def __init__(self, size):
        self.size = size
        if getattr(_reformatters, "pid", None) != os.getpid():  # never reuse one across fork()
            _reformatters.reformatter, _reformatters.pid = VideoReformatter(), os.getpid()
        self.reformatter = _reformatters.reformatter

    def __call__(self, frame):
        # threads=1: swscale's default slice threads cost more than they save on frames this small,
        # and a scaler whose thread pool was created before a fork() deadlocks in the child
        if self.size is None or tuple(self.size) == (frame.height, frame.width):
            return self.reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
        height, width = self.size
        return self.reformatter.reformat(frame, width, height, "rgb24", interpolation=SCALE_FLAGS,
                                         threads=1).to_ndarray()


def probe_video(path):
    """Frame count (the frames a full decode yields: counted from the packets, as WebM/MKV headers
    report 0), frame rate and size."""
    with _VideoFile(path) as video:
        return video.info


def decode_frames(path, indices, size=None):
    """Frames at the given 0-based presentation-order indices (any order, repeats allowed) as a
    (T, H, W, 3) uint8 RGB array. `size=(height, width)` scales in FFmpeg's scaler while converting,
    so full-size RGB frames never exist. An index outside the video raises DataError naming the file."""
    with _VideoFile(path) as video:
        return video.decode(indices, size)


def load_clip(path, choose, size_for=None):
    """Probe, choose and decode with one open (what VideoDataset does): `choose(info)` returns the
    frame indices, `size_for(info)` the (height, width) or None. Returns (info, indices, frames)."""
    with _VideoFile(path) as video:
        indices = choose(video.info)
        size = size_for(video.info) if size_for is not None else None
        return video.info, indices, video.decode(indices, size)


def frame_size(info, min_pixels, max_pixels):
    """(height, width) the frames are scaled to: Qwen2.5-VL's rule, sides multiples of 28."""
    return smart_resize(info.height, info.width, 28, min_pixels, max_pixels)


def num_frames_to_sample(info, video_fps, video_maxlen, video_num_frames):
    """LLaMA-Factory's rule, min(maxlen, floor(duration * fps), frame count), or a fixed count; always
    even and >= 2, because Qwen2.5-VL patches time in pairs (odd counts round down). A clip with fewer
    frames than that repeats frames (see sample_indices)."""
    if video_num_frames is not None:
        n = video_num_frames
    else:
        n = min(video_maxlen, math.floor(info.num_frames / info.fps * video_fps), info.num_frames)
    return max(2, n - n % 2)


def sample_indices(num_frames, n, rng=None, offset=0.5):
    """TSN segment sampling: split the clip into n equal segments and take one frame from each, at a
    random offset (training, rng given) or at `offset` of each segment (evaluation: 0.5, the centre;
    clip c of C evaluation clips uses (c + 0.5) / C). A clip shorter than n frames repeats frames
    rather than failing."""
    edges = np.linspace(0, num_frames, n + 1)
    if rng is None:
        points = edges[:-1] + offset * (edges[1:] - edges[:-1])
    else:
        points = edges[:-1] + rng.random(n) * (edges[1:] - edges[:-1])
    return np.clip(np.floor(points).astype(np.int64), 0, num_frames - 1)


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """Qwen2-VL's resize rule: sides multiples of `factor` (28), area within [min_pixels, max_pixels],
    aspect ratio kept."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# Opt-in cache of decoded, resized frames (`video_cache_dir`).
#
# What it stores: EVERY frame of a clip, scaled to the pixel budget, as raw uint8 RGB. Random training
# offsets can land on any frame, so a cache of one sample's frames would either freeze the offsets or
# miss every epoch; with all frames, cached and uncached items are identical and one file serves every
# video_fps / video_maxlen / video_num_frames setting. The cost is disk: frames x height x width x 3
# bytes (UCF101 at the 112x84 budget: 28 KB a frame, ~5 MB for a 7 s clip, ~50 GB for the 9.5k training
# clips; SSv2 at 112x84 needs ~1 MB a clip). The first epoch pays for decoding every frame once.
# One file per (clip, pixel budget), named by a hash of the clip's absolute path, size and mtime and
# the budget: editing a video or changing the budget makes a new file, old ones are never read again.
# Writes go to a unique temp name, then os.replace: several workers and ranks may race on a clip, each
# write is whole, readers see a complete file or none. Reads memory-map the file and copy only the
# frames a sample uses.

CACHE_MAGIC = b"actcls-frames-v1\n"  # bump when decoding or scaling changes pixels
CACHE_HEADER = 4096  # bytes: magic + JSON, space-padded; the frames follow


def cache_file(cache_dir, path, min_pixels, max_pixels):
    stat = os.stat(path)
    key = json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, min_pixels, max_pixels,
                      CACHE_MAGIC.decode()])
    digest = hashlib.sha1(key.encode()).hexdigest()
    return os.path.join(cache_dir, digest[:2], digest + ".frames")


def _read_cache(file):
    """(info, read-only memmap of all frames), or None when absent or not a complete cache file."""
    try:
        with open(file, "rb") as f:
            head = f.read(CACHE_HEADER)
            if not head.startswith(CACHE_MAGIC):
                return None
            meta = json.loads(head[len(CACHE_MAGIC):])
            shape = tuple(meta["shape"])
            if os.fstat(f.fileno()).st_size != CACHE_HEADER + math.prod(shape):
                return None
            frames = np.memmap(f, dtype=np.uint8, mode="r", offset=CACHE_HEADER, shape=shape)
        info = VideoInfo(**meta["info"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return info, frames


def _write_cache(file, info, frames):
    meta = json.dumps({"info": asdict(info), "shape": list(frames.shape)}).encode()
    head = (CACHE_MAGIC + meta).ljust(CACHE_HEADER, b" ")
    assert len(head) == CACHE_HEADER
    tmp = f"{file}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(np.ascontiguousarray(frames).data)
        os.replace(tmp, file)
    except OSError as e:  # a full or read-only disk must not stop training: the item is still right
        warnings.warn(f"video cache: could not write {file} ({e}); continuing without caching it")
        with contextlib.suppress(OSError):
            os.remove(tmp)


def cached_clip(path, cache_dir, min_pixels, max_pixels):
    """(info, frames): every frame of the clip at frame_size(info, min_pixels, max_pixels), from the
    cache when it holds the clip (no video is opened), else decoded and written to it."""
    file = cache_file(cache_dir, path, min_pixels, max_pixels)
    hit = _read_cache(file)
    if hit is not None:
        return hit
    with _VideoFile(path) as video:
        info = video.info
        frames = video.decode(range(info.num_frames), frame_size(info, min_pixels, max_pixels))
    _write_cache(file, info, frames)
    return info, frames


# ---------------------------------------------------------------------------------------------------
# Dataset and batches

@dataclass
class VideoSettings:
    video_fps: float
    video_maxlen: int
    video_num_frames: int | None
    video_min_pixels: int
    video_max_pixels: int
    video_cache_dir: str | None = None  # see cached_clip


SINGLE_VIEW = (0, 1, 0, 1)  # (clip, num_clips, crop, num_crops)


class VideoDataset(torch.utils.data.Dataset):
    """Items are addressed as (index, epoch, train, view): the random frame offsets come from a
    generator seeded by (seed, epoch, index), so they do not depend on workers and resume exactly;
    `view` picks one of the evaluation views (temporal clip x spatial crop).

    A video that cannot be read (truncated, not a video, fewer frames than its header says) does not
    stop the run: the next readable sample stands in, and the item lists what was skipped. In
    evaluation the stand-in is marked invalid, so it counts nowhere."""

    def __init__(self, samples, settings, seed=0):
        self.samples, self.settings, self.seed = samples, settings, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, train, view = key if len(key) == 4 else (*key, SINGLE_VIEW)
        skipped, space = [], self.samples[index].label_space
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if self.samples[i].label_space != space:  # a batch holds one label space
                continue
            try:
                item = self.load(i, epoch, train, view)
            except DataError as e:
                skipped.append(f"{self.samples[i].source}: {e}")
                continue
            return {**item, "index": index, "valid": train or i == index, "skipped": skipped}
        raise DataError(f"no readable video among {len(self.samples)} samples:\n" + "\n".join(skipped[:20]))

    def load(self, index, epoch, train, view):
        sample, s = self.samples[index], self.settings
        rng = np.random.default_rng([self.seed, epoch, index]) if train else None
        clip, num_clips, crop, num_crops = view

        def choose(info):
            n = num_frames_to_sample(info, s.video_fps, s.video_maxlen, s.video_num_frames)
            return sample_indices(info.num_frames, n, rng, offset=(clip + 0.5) / num_clips)

        if s.video_cache_dir is not None:  # all frames of the clip, already scaled; pick on read
            info, frames = cached_clip(sample.video, s.video_cache_dir, s.video_min_pixels, s.video_max_pixels)
            indices = choose(info)
            frames = np.ascontiguousarray(frames[indices])
        else:  # one open: probe, choose, decode just those frames
            info, indices, frames = load_clip(
                sample.video, choose, lambda info: frame_size(info, s.video_min_pixels, s.video_max_pixels))
        return {"frames": spatial_crop(frames, crop, num_crops), "indices": indices, "info": info, "sample": sample}


def spatial_crop(frames, crop, num_crops):
    """Crop `crop` of `num_crops` (1: the whole frame; 3: the start, centre and end of the longer side,
    as squares of the shorter side: the 3-crop test of the action recognition literature). The frames
    are already scaled, so sides stay multiples of 28."""
    if num_crops == 1:
        return frames
    height, width = frames.shape[1:3]
    side = min(height, width)
    start = (max(height, width) - side) * crop // (num_crops - 1)
    return frames[:, start:start + side] if height > width else frames[:, :, start:start + side]


def prompt_messages(messages):
    """sharegpt messages -> chat-template messages, the <video> placeholder as a video item."""
    out = []
    for m in messages:
        content = m["content"]
        if VIDEO_TOKEN in content:
            before, after = content.split(VIDEO_TOKEN, 1)
            content = [{"type": "text", "text": before}] if before else []
            content += [{"type": "video"}] + ([{"type": "text", "text": after}] if after else [])
        out.append({"role": m["role"], "content": content})
    return out


def prompt_text(processor, messages):
    """The chat-formatted conversation cut right after <ACT>: causal attention means nothing after
    it can change its hidden state, so those tokens are pure cost."""
    text = processor.apply_chat_template(prompt_messages(messages), tokenize=False)
    return text[: text.index(ACT_TOKEN) + len(ACT_TOKEN)]


class Collator:
    """Runs the processor on a list of dataset items (in DataLoader workers) and adds `act_index`,
    `labels` and `label_space`. A batch holds a single label space."""

    def __init__(self, processor, act_token_id):
        self.processor, self.act_token_id = processor, act_token_id

    def __call__(self, items):
        from transformers.video_utils import VideoMetadata

        spaces = {it["sample"].label_space for it in items}
        assert len(spaces) == 1, f"a batch mixes label spaces {spaces}"
        metadata = [VideoMetadata(total_num_frames=it["info"].num_frames, fps=it["info"].fps,
                                  frames_indices=it["indices"].tolist()) for it in items]
        batch = self.processor(
            text=[prompt_text(self.processor, it["sample"].messages) for it in items],
            videos=[it["frames"] for it in items], video_metadata=metadata, do_resize=False,
            do_sample_frames=False, padding=True, return_tensors="pt")
        is_act = batch["input_ids"] == self.act_token_id
        assert (is_act.sum(1) == 1).all(), "every row must hold exactly one <ACT>"
        labels = [it["sample"].label if it["valid"] else None for it in items]
        return {
            "inputs": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "mm_token_type_ids": batch["mm_token_type_ids"],
                       "pixel_values_videos": batch["pixel_values_videos"],
                       "video_grid_thw": batch["video_grid_thw"],
                       "second_per_grid_ts": batch["second_per_grid_ts"],
                       "act_index": is_act.int().argmax(1)},
            "labels": torch.tensor([-100 if label is None else label for label in labels]),
            "label_space": spaces.pop(),
            "index": torch.tensor([it["index"] for it in items]),
            "sources": [it["sample"].source for it in items],  # "file:line" of each record
            "valid": torch.tensor([it["valid"] for it in items]),
            "skipped": [msg for it in items for msg in it["skipped"]],
        }


def sample_lengths(dataset):
    """Each sample's video token count (the <|video_pad|> tokens the processor will emit), from a probe
    of the file, no decoding: (frames / 2) x (height / 28) x (width / 28) after Qwen2.5-VL's resize.
    The length proxy for group_by_length; the text part is left out, since a dataset's prompts are
    usually one template. Computed once per run (a probe is ~1 ms for AVI/MP4; WebM demuxes packets)."""
    s = dataset.settings
    lengths = []
    for sample in dataset.samples:
        info = probe_video(sample.video)
        n = num_frames_to_sample(info, s.video_fps, s.video_maxlen, s.video_num_frames)
        height, width = frame_size(info, s.video_min_pixels, s.video_max_pixels)
        lengths.append(n // 2 * (height // 28) * (width // 28))
    return np.asarray(lengths, dtype=np.int64)


def group_by_length(order, lengths, per_step, chunk_steps=50):
    """Reorders `order` so each run of per_step samples has similar lengths: chunks of chunk_steps
    optimizer steps (in the random order) are sorted by length, longest first. The randomness that
    is left: which samples share a chunk, and the order of the steps (shuffled afterwards)."""
    chunk = per_step * chunk_steps
    return np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                           for part in np.split(order, range(chunk, len(order), chunk))])


def train_batches(dataset_sizes, weights, batch_size, accumulation, world_size, rank, epoch, seed, lengths=None):
    """This rank's micro-batches for one epoch, in order, as lists of (global_index, epoch, True) keys.

    The datasets are concatenated; each contributes round(weight * size) samples per epoch (drawn
    without replacement while it can, then again), shuffled with (seed, epoch). They are cut into
    optimizer-step groups of batch_size * accumulation * world_size samples from one dataset (so one
    label space), and the groups are shuffled. Micro-batch m of rank r is the group's slice
    (m * world_size + r). So any batch_size x accumulation x world_size with the same product trains
    on exactly the same samples at every step: that is what makes gradient accumulation (and
    changing the GPU count) exact. Incomplete groups are dropped, so ranks step in lockstep.
    `lengths` (per global index, e.g. sample_lengths): group similar lengths into the same optimizer
    step, and so into the same micro-batches, to cut padding (group_by_length); the samples and the
    dropped remainder are the same as without it.
    """
    rng = np.random.default_rng([seed, epoch])
    offsets = np.cumsum([0] + list(dataset_sizes))
    per_step = batch_size * accumulation * world_size
    groups = []
    for d, (size, weight) in enumerate(zip(dataset_sizes, weights)):
        count = round(weight * size)
        order = np.concatenate([rng.permutation(size) for _ in range(math.ceil(count / size))])[:count]
        order = order + offsets[d]
        if lengths is not None:  # drop the same remainder as without grouping, then sort within chunks
            order = group_by_length(order[:count - count % per_step], np.asarray(lengths), per_step)
        groups += [order[i:i + per_step] for i in range(0, count - per_step + 1, per_step)]
    batches = []
    for g in rng.permutation(len(groups)):
        for micro in range(accumulation):
            start = (micro * world_size + rank) * batch_size
            batches.append([(int(j), epoch, True) for j in groups[g][start:start + batch_size]])
    return batches


def eval_batches(counts, batch_size, world_size, rank, view=SINGLE_VIEW):
    """Each sample of the concatenated datasets (sizes `counts`) exactly once across ranks (no
    padding duplicates, unlike DistributedSampler); a batch never spans two datasets, so it holds
    one label space."""
    batches, offset = [], 0
    for count in counts:
        mine = list(range(offset + rank, offset + count, world_size))
        batches += [[(j, 0, False, view) for j in mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]
        offset += count
    return batches


# ---------------------------------------------------------------------------------------------------
# Datasets as configured (train_datasets / eval_datasets) and the loaders over them

@dataclass
class DatasetMix:
    """Several dataset files concatenated into one VideoDataset; global index i belongs to entry
    `entry_of(i)`. `classes`: label_space -> class names, from a classes.json beside the records."""
    dataset: VideoDataset
    names: list  # one per entry, for per-dataset metrics
    spaces: list  # each entry's label space
    counts: list
    weights: list
    classes: dict
    bad_videos: list  # records left out because their video is missing or empty
    warning: str | None  # what to tell the user about them

    def entry_of(self, index):
        return int(np.searchsorted(np.cumsum(self.counts), index, side="right"))


def load_datasets(entries, head_sizes, settings, max_bad_video_fraction, seed=0, require_label=True):
    samples, counts, weights, names, spaces, classes, bad_videos = [], [], [], [], [], {}, []
    for entry in entries:
        space = entry.get("label_space", "default")
        spaces.append(space)
        part, bad = load_samples(entry["path"], entry.get("video_root"), head_sizes[space], space, require_label)
        samples, bad_videos = samples + part, bad_videos + bad
        counts.append(len(part))
        weights.append(float(entry.get("weight", 1.0)))
        names.append(entry.get("name", os.path.basename(os.path.dirname(os.path.abspath(entry["path"])))))
        names_file = os.path.join(os.path.dirname(os.path.abspath(entry["path"])), "classes.json")
        if os.path.isfile(names_file):
            with open(names_file, encoding="utf-8") as f:
                class_names = json.load(f)
            if len(class_names) != head_sizes[space]:
                raise DataError(f"{names_file} lists {len(class_names)} classes but label space {space!r} has "
                                f"{head_sizes[space]} (num_action_classes / label_spaces): make them agree")
            classes[space] = class_names
    if len(set(names)) < len(names):  # two files in folders of the same name: tell them apart
        names = [f"{n}/{os.path.basename(e['path'])}" for n, e in zip(names, entries)]
    warning = check_bad_videos(bad_videos, len(samples) + len(bad_videos), max_bad_video_fraction)
    return DatasetMix(VideoDataset(samples, settings, seed), names, spaces, counts, weights, classes, bad_videos,
                      warning)


def ignore_ctrl_c(worker_id):
    """A Ctrl-C in a terminal signals the whole process group. The trainer handles it (finishes the
    step, saves); a worker that died of it would crash the run before the save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batches, collate, num_workers, seed):
    """Workers start from a forkserver, not a fork of the training process: forking a process that
    runs threads (TensorBoard's writer, FFmpeg's, OpenMP's) can copy a held lock into the child and
    hang it. They persist, so they start once. Its own generator: creating an iterator must not draw
    from the global RNG (dropout's), or a resumed run would drift from an uninterrupted one."""
    context = None
    if num_workers:
        context = torch.multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "transformers", "data"])  # imported once, in the server
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                                       multiprocessing_context=context, persistent_workers=num_workers > 0,
                                       worker_init_fn=ignore_ctrl_c if num_workers else None,
                                       generator=torch.Generator().manual_seed(seed),
                                       prefetch_factor=4 if num_workers else None)


class EpochBatches:
    """This rank's micro-batches, epoch after epoch without end, from (epoch, position) on. One
    DataLoader iterates it for the whole run."""

    def __init__(self, mix, cfg, world, rank, epoch, position, lengths=None):
        self.args = (mix.counts, mix.weights, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                     world, rank)
        self.seed, self.epoch, self.position, self.lengths = cfg.seed, epoch, position, lengths
        self.per_epoch = len(self.batches(0))
        if self.per_epoch == 0:
            raise DataError("the training set is smaller than one optimizer step (per_device_train_batch_size x "
                            "gradient_accumulation_steps x world size): lower the batch size")

    def batches(self, epoch):
        return train_batches(*self.args, epoch, self.seed, self.lengths)

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            yield from self.batches(epoch)[position:]
            epoch, position = epoch + 1, 0


def batch_stream(mix, collate, cfg, rank, world, epoch, position):
    """Yields (epoch, position, batch), where (epoch, position) is where the next batch comes from:
    what a checkpoint records to resume mid-epoch."""
    lengths = sample_lengths(mix.dataset) if cfg.group_by_length else None  # one probe per clip, once
    plan = EpochBatches(mix, cfg, world, rank, epoch, position, lengths)
    for batch in make_loader(mix.dataset, plan, collate, cfg.dataloader_num_workers, cfg.seed):
        position += 1
        if position == plan.per_epoch:
            epoch, position = epoch + 1, 0
        yield epoch, position, batch
