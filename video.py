"""Video files and frame folders -> exactly the sampled frames, scaled, as uint8 RGB arrays. No
project imports.

    probe_video(path, fps=None) -> VideoInfo (frame count, fps, size)
    decode_frames(path, indices, size=None) -> (T, H, W, 3) uint8, exactly the frames at those indices
    load_sampled(path, settings, rng, view, fps) -> (info, indices, frames): what a dataset item needs
    cached_clip(...)  the opt-in cache of decoded, resized frames (`video_cache_dir`)
    frame_files(folder) -> the frame images of a frame folder, in frame order

`path` is a video file or a frame folder (a directory of images, one frame each: img_00001.jpg,
00001.jpg, frame_000001.png, ...); a folder has no frame rate of its own, so `fps` gives it (the
record's `fps`, or the dataset entry's `frame_fps`); a video file's own rate always wins. A video that
cannot be read raises DataError naming the file (for a folder: the frame).
"""

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import threading
import warnings
from dataclasses import asdict, dataclass

import av
import numpy as np
from PIL import Image
from av.video.reformatter import Interpolation, VideoReformatter


class DataError(ValueError):
    """A dataset file or video that cannot be used; the message names it and says what to do."""


@dataclass
class VideoSettings:
    """How frames are sampled and scaled (config keys of the same names; config.video_settings)."""
    video_fps: float
    video_maxlen: int
    video_num_frames: int | None
    video_min_pixels: int
    video_max_pixels: int
    video_cache_dir: str | None = None  # see cached_clip
    # The model family's vision geometry (model.vision_geometry reads it from the processor): frame
    # sides are multiples of patch_size x merge_size (28 for Qwen2/2.5-VL, 32 for Qwen3-VL/3.5), and
    # frame counts multiples of temporal_patch_size (every Qwen-VL patches time in pairs).
    resize_factor: int = 28
    temporal_patch_size: int = 2

    @property
    def budget(self):
        """What fixes a frame's scaled size (frame_size's arguments after info), and a cache file's."""
        return self.video_min_pixels, self.video_max_pixels, self.resize_factor


# ---------------------------------------------------------------------------------------------------
# Probe, choose frame indices, decode exactly those frames
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
        indices = _checked_indices(self.path, indices, self.info.num_frames)
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


# ---------------------------------------------------------------------------------------------------
# Frame folders: a directory of images, one frame each (mmaction2's rawframes, extracted JPEGs)
#
# Frame i is the i-th image in the order of the number in its name (img_00001.jpg, 00001.jpg,
# frame_000001.png; the last run of digits), so 2 < 10 whatever the zero padding. The numbers must
# run without a gap: a missing frame would shift every later frame's time. mmaction2's rawframes
# folders also hold optical flow (flow_x_00001.jpg, flow_y_...): a folder with several series of
# images reads the one series not named flow*, and refuses to guess among several others.
# Scaling is the video path's: the same swscale bicubic, from the decoded RGB image. A JPEG whose
# pixel budget is half its size or less is decoded at 1/2, 1/4 or 1/8 of it (libjpeg's DCT scaling,
# PIL's Image.draft: the largest reduction that still covers the target size), which skips most of
# the decoding work, then scaled the rest of the way.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")  # prefix, the last run of digits, the rest (extension)


def frame_files(folder):
    """The frame images of a frame folder in frame order (full paths). DataError naming the folder
    when it holds no numbered images, several series of them, the same number twice, or a gap."""
    try:
        names = [e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_EXTENSIONS)
                 and not e.name.startswith(".") and e.is_file()]
    except OSError as e:
        raise DataError(f"{folder}: cannot list the frame folder ({e.strerror or e})") from None
    series = {}
    for name in names:
        m = _NUMBERED.match(name)
        if m is None:
            raise DataError(f"{os.path.join(folder, name)}: a frame's name must hold its number "
                            f"(img_00001.jpg, 00001.jpg, frame_000001.png)")
        series.setdefault((m.group(1), m.group(3).lower()), []).append((int(m.group(2)), name))
    if not series:
        raise DataError(f"{folder}: the frame folder holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    if len(series) > 1:  # rawframes: img_* beside flow_x_* / flow_y_*
        series = {k: v for k, v in series.items() if not k[0].lower().startswith("flow")} or series
    if len(series) > 1:
        shown = sorted(f"{p}N{e}" for p, e in series)
        raise DataError(f"{folder}: the frame folder mixes {len(series)} series of images ({', '.join(shown[:4])}); "
                        f"keep one series of frames per folder")
    numbered = sorted(series.popitem()[1])
    return [os.path.join(folder, name) for name in _checked_run(folder, numbered)]


def _checked_run(folder, numbered):
    """[(number, name)] sorted -> the names, after checking the numbers run first..last, once each."""
    for (a, name_a), (b, name_b) in zip(numbered, numbered[1:]):
        if a == b:
            raise DataError(f"{folder}: frames {name_a} and {name_b} have the same number; keep one of them")
        if b != a + 1:
            digits = _NUMBERED.match(name_a)
            width = len(digits.group(2))
            missing = f"{digits.group(1)}{str(a + 1).zfill(width)}{digits.group(3)}"
            raise DataError(f"{os.path.join(folder, missing)}: frame missing ({b - a - 1} frame(s) missing between "
                            f"{name_a} and {name_b}); a gap would shift every later frame's time: re-extract the clip")
    return [name for _, name in numbered]


def read_frame(file, size=None, full_size=None):
    """One image -> (H, W, 3) uint8 RGB, scaled to size = (height, width) like a video's frames. JPEGs
    are decoded with DCT scaling when the target is at most half their size (see above). full_size:
    the (width, height) the image must have (a clip's frames share one size)."""
    try:
        with Image.open(file) as image:
            found, rgb = image.size, None
            if full_size is None or found == tuple(full_size):
                if size is not None and image.format == "JPEG":
                    image.draft("RGB", (size[1], size[0]))  # a no-op unless 1/2, 1/4 or 1/8 still covers size
                rgb = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a cut or foreign file
        raise DataError(f"{file}: cannot read the frame ({e})") from None
    if rgb is None:
        raise DataError(f"{file}: frame is {found[0]}x{found[1]}, the folder's first frame {full_size[0]}x"
                        f"{full_size[1]}; every frame of a clip must have one size")
    if size is None or tuple(size) == rgb.shape[:2]:
        return rgb
    return _Converter(size)(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"))


class _FrameFolder:
    """A frame folder with the interface of _VideoFile (info, decode). fps None: the rate is unknown,
    and whatever needs it (sampling, the model's timing) stops with a request for it (_require_rate)."""

    def __init__(self, path, fps):
        self.path, self.files = path, frame_files(path)
        try:
            with Image.open(self.files[0]) as first:  # the header alone: size without decoding
                width, height = first.size
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{self.files[0]}: cannot read the frame ({e})") from None
        self.info = VideoInfo(len(self.files), float(fps) if fps is not None else None, width, height)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def decode(self, indices, size=None):
        """See decode_frames. Every frame must have the first frame's size."""
        indices = _checked_indices(self.path, indices, self.info.num_frames)
        full_size = (self.info.width, self.info.height)
        frames = {i: read_frame(self.files[i], size, full_size) for i in dict.fromkeys(indices)}  # repeats read once
        return np.stack([frames[i] for i in indices])


def _checked_indices(path, indices, n):
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not indices:
        raise DataError(f"{path}: no frame indices to decode")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise DataError(f"{path}: frame index {bad[0]} is out of range: the video has {n} frames "
                        f"(valid indices 0..{n - 1})")
    return indices


def open_clip(path, fps=None):
    """A video file or a frame folder, opened (a context manager with .info and .decode)."""
    return _FrameFolder(path, fps) if os.path.isdir(path) else _VideoFile(path)


def no_rate_error(folder):
    """A frame folder's rate is what the record or the dataset entry says: never a guess."""
    return DataError(f"{folder}: a frame folder has no frame rate of its own; give it as `fps` in the record, "
                     f"or as `frame_fps` in the dataset entry (train_datasets / eval_datasets)")


def _require_rate(clip):
    if clip.info.fps is None:
        raise no_rate_error(clip.path)
    return clip.info


def probe_video(path, fps=None):
    """Frame count (the frames a full decode yields: counted from the packets, as WebM/MKV headers
    report 0; a frame folder's images), frame rate and size. fps: a frame folder's rate."""
    with open_clip(path, fps) as clip:
        return _require_rate(clip)


def decode_frames(path, indices, size=None):
    """Frames at the given 0-based presentation-order indices (any order, repeats allowed) as a
    (T, H, W, 3) uint8 RGB array. `size=(height, width)` scales in FFmpeg's scaler while converting,
    so full-size RGB frames never exist. An index outside the video raises DataError naming the file.
    A frame folder's frame i is its i-th image (frame_files)."""
    with open_clip(path) as clip:
        return clip.decode(indices, size)


def load_clip(path, choose, size_for=None, fps=None):
    """Probe, choose and decode with one open (what VideoDataset does): `choose(info)` returns the
    frame indices, `size_for(info)` the (height, width) or None; fps: a frame folder's rate. Returns
    (info, indices, frames)."""
    with open_clip(path, fps) as clip:
        info = _require_rate(clip)
        indices = choose(info)
        size = size_for(info) if size_for is not None else None
        return info, indices, clip.decode(indices, size)


def frame_size(info, min_pixels, max_pixels, factor=28):
    """(height, width) the frames are scaled to: the Qwen-VL rule, sides multiples of `factor` (the
    processor's patch_size x merge_size: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL/3.5)."""
    return smart_resize(info.height, info.width, factor, min_pixels, max_pixels)


def num_frames_to_sample(info, video_fps, video_maxlen, video_num_frames, temporal_patch_size=2):
    """LLaMA-Factory's rule, min(maxlen, floor(duration * fps), frame count), or a fixed count; always
    a multiple of temporal_patch_size and at least one patch, because Qwen-VL patches time in pairs
    (odd counts round down). A clip with fewer frames than that repeats frames (see sample_indices)."""
    if video_num_frames is not None:
        n = video_num_frames
    else:
        n = min(video_maxlen, math.floor(info.num_frames / info.fps * video_fps), info.num_frames)
    return max(temporal_patch_size, n - n % temporal_patch_size)


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
    """Qwen2-VL's resize rule: sides multiples of `factor` (28 or 32), area within [min_pixels, max_pixels],
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
# bytes (a 320x240 UCF101 frame at configs/ucf101.yaml's 16,384 pixels is 140x84, 35 KB: 6.4 MB for a
# 7.2 s, 25 fps clip, ~61 GB for split 1's 9,537 training clips; a 4 s, 12 fps SSv2 clip at 168x84 is
# ~2 MB). The first epoch pays for decoding every frame once.
# One file per (clip, pixel budget), named by a hash of the clip's absolute path, size and mtime and
# the budget: editing a video or changing the budget makes a new file, old ones are never read again.
# Writes go to a unique temp name, then os.replace: several workers and ranks may race on a clip, each
# write is whole, readers see a complete file or none. Reads memory-map the file and copy only the
# frames a sample uses.

CACHE_MAGIC = b"actcls-frames-v1\n"  # bump when decoding or scaling changes pixels
CACHE_HEADER = 4096  # bytes: magic + JSON, space-padded; the frames follow


def cache_file(cache_dir, path, min_pixels, max_pixels, factor=28, fps=None):
    """A frame folder's key also holds every frame's size and mtime (editing one frame leaves the
    folder's own mtime alone) and its fps (the record's, not the folder's: part of the cached info)."""
    stat = os.stat(path)
    stamp = [stat.st_size, stat.st_mtime_ns]
    if os.path.isdir(path):
        stamp = [fps] + [[os.path.basename(f), s.st_size, s.st_mtime_ns] for f in frame_files(path)
                         for s in [os.stat(f)]]
    key = json.dumps([os.path.abspath(path), stamp, min_pixels, max_pixels, factor, CACHE_MAGIC.decode()])
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
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _CACHE_OFF.add(os.path.dirname(os.path.dirname(file)))
        warnings.warn(f"video cache: could not write {file} ({e.strerror or e}); the cache takes no more clips in "
                      f"this process, and training goes on reading the videos")


# Cache folders a write failed in (a full disk): this process writes no more into them (one warning).
_CACHE_OFF = set()


def cached_clip(path, cache_dir, min_pixels, max_pixels, factor=28, fps=None):
    """(info, frames): every frame of the clip at frame_size(info, min_pixels, max_pixels, factor),
    from the cache when it holds the clip (no video is opened), else decoded and written to it.
    fps: a frame folder's rate."""
    if os.path.isdir(path) and fps is None:  # asked for before any file is written
        raise no_rate_error(path)
    file = cache_file(cache_dir, path, min_pixels, max_pixels, factor, fps)
    hit = _read_cache(file)
    if hit is not None:
        return hit
    with open_clip(path, fps) as clip:
        info = _require_rate(clip)
        frames = clip.decode(range(info.num_frames), frame_size(info, min_pixels, max_pixels, factor))
    if os.path.dirname(os.path.dirname(file)) not in _CACHE_OFF:
        _write_cache(file, info, frames)
    return info, frames


# ---------------------------------------------------------------------------------------------------
# A dataset item's frames: sample, decode (or read the cache), crop the view

SINGLE_VIEW = (0, 1, 0, 1)  # (clip, num_clips, crop, num_crops): one view of the whole clip


def load_sampled(path, settings, rng=None, view=SINGLE_VIEW, fps=None):
    """(info, indices, frames) of one clip as training and evaluation see it: TSN indices (random
    offsets from `rng` in training, else the centre of each segment shifted for clip c of C),
    scaled to the pixel budget, cropped to the view's spatial crop. fps: a frame folder's rate."""
    clip, num_clips, crop, num_crops = view

    def choose(info):
        n = num_frames_to_sample(info, settings.video_fps, settings.video_maxlen, settings.video_num_frames,
                                 settings.temporal_patch_size)
        return sample_indices(info.num_frames, n, rng, offset=(clip + 0.5) / num_clips)

    budget = settings.budget
    if settings.video_cache_dir is not None:  # all frames of the clip, already scaled; pick on read
        info, frames = cached_clip(path, settings.video_cache_dir, *budget, fps)
        indices = choose(info)
        frames = np.ascontiguousarray(frames[indices])
    else:  # one open: probe, choose, decode just those frames
        info, indices, frames = load_clip(path, choose, lambda info: frame_size(info, *budget), fps)
    return info, indices, spatial_crop(frames, crop, num_crops)


def spatial_crop(frames, crop, num_crops):
    """Crop `crop` of `num_crops` (1: the whole frame; 3: the start, centre and end of the longer side,
    as squares of the shorter side: the 3-crop test of the action recognition literature). The frames
    are already scaled, so sides stay multiples of the resize factor."""
    if num_crops == 1:
        return frames
    height, width = frames.shape[1:3]
    side = min(height, width)
    start = (max(height, width) - side) * crop // (num_crops - 1)
    return frames[:, start:start + side] if height > width else frames[:, :, start:start + side]
