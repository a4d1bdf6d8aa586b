"""The video path (video.py): exact frames for every container, robust frame counts,
TSN sampling, temporal positions that follow the sampled frame rate, early scaling that matches the
Qwen processor, and a cache that changes nothing but speed.

Fixture videos carry their own frame index as big black/white blocks (one block per bit), a pattern
no codec at these qualities can blur into another index; the reference decodes every frame in order."""

import glob
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import video
from data import Collator, Sample, VideoDataset
from video import (DataError, VideoSettings, decode_frames, frame_size, num_frames_to_sample, probe_video,
                   sample_indices, smart_resize)
from model import ACT_TOKEN
from prepare.synthetic import textured_clip, write_video
from prepare.tiny_model import TinySize, build_processor, tiny_config

T = 48  # frames in the stamped fixtures: 6 index bits
H, W = 64, 96  # 2 rows x 3 columns of 32x32 bit blocks
BITS = 6


# ---------------------------------------------------------------------------------------------------
# fixtures

def stamped(num_frames=T):
    """(T, H, W, 3) frames whose blocks spell their index in binary (white = 1) on grey."""
    frames = np.full((num_frames, H, W, 3), 128, np.uint8)
    for t in range(num_frames):
        for b in range(BITS):
            r, c = divmod(b, 3)
            frames[t, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = 255 if (t >> b) & 1 else 0
    return frames


def read_stamp(frame):
    """The index a (H, W, 3) frame carries (block centres only, away from coding artefacts)."""
    return sum(1 << b for b in range(BITS)
               if frame[(b // 3) * 32 + 8:(b // 3) * 32 + 24, (b % 3) * 32 + 8:(b % 3) * 32 + 24].mean() > 128)


def encode(path, frames, fps, codec, options):
    """write_video with chosen codec options (GOP length, B-frames) and any container."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.thread_count = 1
        stream.options = options
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, stream.codec_context.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


MPEG4 = {"flags": "+qscale", "global_quality": str(3 * 118)}
X264 = {"preset": "veryfast", "crf": "18"}
VP9 = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0", "lag-in-frames": "0"}
# name -> (file name, fps, codec, options); None: prepare.synthetic.write_video's own settings
KINDS = {
    "avi": ("a.avi", 25, None, None),  # MPEG-4 Part 2, I/P, GOP 12 (UCF101's codec family)
    "avi_bframes": ("b.avi", 25, "mpeg4", {**MPEG4, "bf": "2", "g": "12"}),
    "mp4_bframes": ("c.mp4", 25, None, None),  # H.264 with B-frames, one keyframe
    "mp4_gops": ("d.mp4", 25, "libx264", {**X264, "bf": "3", "g": "10", "x264-params": "scenecut=0"}),
    "mp4_open_gop": ("e.mp4", 25, "libx264", {**X264, "bf": "3", "g": "10", "x264-params": "scenecut=0:open-gop=1"}),
    "webm": ("f.webm", 12, None, None),  # VP9, one keyframe (SSv2's codec)
    "webm_gops": ("g.webm", 12, "libvpx-vp9", {**VP9, "g": "10"}),
    "webm_altref": ("h.webm", 12, "libvpx-vp9", {"deadline": "good", "cpu-used": "5", "crf": "30", "b": "0",
                                                 "g": "20", "lag-in-frames": "16", "auto-alt-ref": "1"}),
    "mkv_bframes": ("i.mkv", 25, "mpeg4", {**MPEG4, "bf": "2", "g": "12"}),  # no frame count in the header
}
MULTI_GOP = {"avi", "avi_bframes", "mp4_gops", "mp4_open_gop", "webm_gops", "mkv_bframes"}


def reference(path):
    """Every frame, decoded in order, full size (the definition of the frame index)."""
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> (path, reference frames)."""
    root, frames, out = tmp_path_factory.mktemp("videos"), stamped(), {}
    for name, (file, fps, codec, options) in KINDS.items():
        path = str(root / file)
        if codec is None:
            write_video(path, frames, fps)
        else:
            encode(path, frames, fps, codec, options)
        out[name] = (path, reference(path))
    return out


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if decode_frames gives up on the keyframe path and decodes everything in order."""
    def refuse(self, wanted, convert):
        raise AssertionError(f"{self.path}: fell back to decoding every frame")
    monkeypatch.setattr(video._VideoFile, "_decode_in_order", refuse)


def write_clip(path, num_frames, fps, height=240, width=320, seed=0):
    write_video(str(path), textured_clip(np.random.default_rng(seed), num_frames, height, width), fps)
    return str(path)



# ---------------------------------------------------------------------------------------------------
# exact frames

def test_fixtures_carry_their_index(videos):
    for name, (path, ref) in videos.items():
        assert [read_stamp(f) for f in ref] == list(range(T)), name


@pytest.mark.parametrize("name", list(KINDS))
def test_decode_frames_exact(videos, name, no_fallback):
    path, ref = videos[name]
    indices = [T - 1, 0, 17, 17, 3, 30, 29, 5, T - 1]  # unsorted, repeated, the last frame
    got = decode_frames(path, indices)
    assert got.dtype == np.uint8 and got.shape == (len(indices), H, W, 3)
    assert [read_stamp(f) for f in got] == indices
    assert np.array_equal(got, ref[indices])  # bit-exact against decoding every frame in order
    rng = np.random.default_rng(0)
    for _ in range(10):
        indices = rng.integers(0, T, rng.integers(1, 10))
        assert np.array_equal(decode_frames(path, indices), ref[indices]), indices


@pytest.mark.parametrize("name", sorted(MULTI_GOP))
def test_decode_skips_to_keyframes(videos, name):
    """The last frame of a multi-GOP clip is decoded from the last keyframe, not from frame 0."""
    with video._VideoFile(videos[name][0]) as opened:
        ((start, end),) = opened._runs({T - 1})
        assert start > 0 and opened.packets[start].is_keyframe


@pytest.mark.parametrize("name", ["avi_bframes", "mp4_open_gop", "webm"])
def test_in_order_fallback_exact(videos, name):
    """When timestamps cannot order the frames, decoding every frame in order is still exact."""
    path, ref = videos[name]
    with video._VideoFile(path) as opened:
        opened.order = None
        indices = [T - 1, 4, 4, 0, 21]
        assert np.array_equal(opened.decode(indices), ref[indices])


def test_out_of_range_index_names_the_file(videos):
    path, _ = videos["webm"]
    for bad in ([T], [0, -1]):
        with pytest.raises(DataError, match=f"{os.path.basename(path)}.*out of range.*{T} frames"):
            decode_frames(path, bad)


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(DataError, match="broken.avi"):
        probe_video(str(bad))


# ---------------------------------------------------------------------------------------------------
# frame count and rate

@pytest.mark.parametrize("name", list(KINDS))
def test_probe_counts_what_a_full_decode_yields(videos, name):
    path, ref = videos[name]
    info = probe_video(path)
    assert info.num_frames == len(ref) == T
    assert info.fps == pytest.approx(KINDS[name][1], rel=1e-3)
    assert (info.width, info.height) == (W, H)
    with av.open(path) as container:  # both kinds of file are covered
        header = container.streams.video[0].frames
    assert header == (0 if name.startswith(("webm", "mkv")) else T)


# ---------------------------------------------------------------------------------------------------
# sampling

def info_of(num_frames, fps):
    return video.VideoInfo(num_frames, fps, 320, 240)


def test_num_frames_fps_maxlen_and_fixed():
    clip = info_of(200, 25.0)  # 8 s
    assert num_frames_to_sample(clip, 2.0, 128, None) == 16  # floor(8 s * 2 fps)
    assert num_frames_to_sample(clip, 2.0, 10, None) == 10  # capped by video_maxlen
    assert num_frames_to_sample(clip, 1.5, 128, None) == 12
    assert num_frames_to_sample(clip, 1.4, 128, None) == 10  # floor(11.2) = 11 -> even: 10
    assert num_frames_to_sample(clip, 2.0, 9, None) == 8  # odd maxlen -> even
    assert num_frames_to_sample(clip, 50.0, 1000, None) == 200  # never more than the clip has
    assert num_frames_to_sample(clip, 2.0, 128, 7) == 6  # fixed count, odd -> even
    assert num_frames_to_sample(clip, 2.0, 128, 32) == 32
    assert num_frames_to_sample(info_of(3, 25.0), 2.0, 128, None) == 2  # 0.12 s clip: at least 2
    assert num_frames_to_sample(info_of(1, 25.0), 2.0, 128, None) == 2


def test_eval_sampling_takes_segment_centres():
    assert sample_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert sample_indices(48, 16).tolist() == list(range(1, 48, 3))
    assert np.array_equal(sample_indices(100, 4), sample_indices(100, 4))


def test_train_sampling_random_offsets_within_segments():
    num_frames, n = 100, 8
    edges = np.linspace(0, num_frames, n + 1)
    seen = set()
    for seed in range(200):
        a = sample_indices(num_frames, n, np.random.default_rng(seed))
        assert np.array_equal(a, sample_indices(num_frames, n, np.random.default_rng(seed)))  # deterministic
        assert np.all(a >= np.floor(edges[:-1])) and np.all(a <= np.ceil(edges[1:]) - 1)  # one per segment
        assert np.all(np.diff(a) >= 0)
        seen.add(int(a[0]))
    assert seen == set(range(0, 13))  # the offset covers the whole first segment [0, 12.5)
    # the dataset seeds by (seed, epoch, index): epochs differ, reruns repeat
    first = [sample_indices(num_frames, n, np.random.default_rng([0, epoch, 5])).tolist() for epoch in (0, 1, 0)]
    assert first[0] == first[2] != first[1]


def test_clip_shorter_than_the_request(videos):
    path, ref = videos["avi"]
    short = str(os.path.join(os.path.dirname(path), "short.avi"))
    write_video(short, stamped(3), 25)
    indices = sample_indices(3, 8)
    assert indices.min() >= 0 and indices.max() <= 2
    frames = decode_frames(short, indices)
    assert [read_stamp(f) for f in frames] == indices.tolist()
    for seed in range(5):
        indices = sample_indices(3, 16, np.random.default_rng(seed))
        assert len(decode_frames(short, indices)) == 16


# ---------------------------------------------------------------------------------------------------
# temporal positions follow the sampled frame rate

def dataset_item(path, video_fps, video_num_frames=None):
    sample = Sample(path, [{"role": "user", "content": "<video>What is happening?"},
                           {"role": "assistant", "content": f"It is {ACT_TOKEN}."}], 0, "default", "test:1")
    settings = VideoSettings(video_fps, 128, video_num_frames, 3136, 3136)
    return VideoDataset([sample], settings)[(0, 0, False)]


@pytest.fixture(scope="module")
def processor():
    processor = build_processor(3136, 3136)
    processor.tokenizer.add_special_tokens({"extra_special_tokens": [ACT_TOKEN]}, replace_extra_special_tokens=False)
    return processor


def test_temporal_position_steps_follow_the_frame_rate(tmp_path, processor):
    from transformers import Qwen2_5_VLModel

    clip25 = write_clip(tmp_path / "clip.avi", 100, 25, 120, 160)  # 4 s at 25 fps
    clip12 = write_clip(tmp_path / "clip.webm", 48, 12, 120, 160)  # 4 s at 12 fps
    collate = Collator(processor, processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN))
    config = tiny_config(TinySize(hidden=64, layers=1, heads=4, vision_depth=1, vision_hidden=32))
    model = Qwen2_5_VLModel(config)

    def temporal_step(item):
        batch = collate([item]).inputs
        position_ids, _ = model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], video_grid_thw=batch["video_grid_thw"],
            second_per_grid_ts=batch["second_per_grid_ts"], attention_mask=batch["attention_mask"])
        temporal = position_ids[0, 0][batch["mm_token_type_ids"][0] == 2].unique()
        assert len(temporal) == len(item.indices) / 2  # one position per temporal patch of 2 frames
        step = set(torch.diff(temporal).tolist())
        assert len(step) == 1  # evenly spaced
        return step.pop()

    steps = {}
    for rate in (1.0, 2.0, 4.0):
        item = dataset_item(clip25, rate)
        assert len(item.indices) == 4 * rate  # 4 s at `rate` frames per second
        steps[rate] = temporal_step(item)
    # the step is the time between patches (2 frames / rate) in tokens_per_second units
    assert steps[1.0] / steps[2.0] == 2.0 and steps[2.0] / steps[4.0] == 2.0
    assert steps[1.0] == config.vision_config.tokens_per_second * 2 / 1.0
    # real time, not frame numbers: another native frame rate, or a fixed count, same spacing in time
    assert temporal_step(dataset_item(clip12, 2.0)) == steps[2.0]
    assert temporal_step(dataset_item(clip25, 2.0, video_num_frames=16)) == steps[4.0]


def test_frame_folder_gives_the_model_the_same_inputs_and_timing(tmp_path, processor):
    """The same clip as a video file and as a PNG frame folder (fps from the record): the processor
    gets the same pixels, grid and seconds per temporal patch (tests/test_frames.py: the frames)."""
    from PIL import Image

    path = write_clip(tmp_path / "clip.mp4", 16, 8, 56, 56)
    os.makedirs(tmp_path / "frames")
    for i, frame in enumerate(decode_frames(path, range(16))):
        Image.fromarray(frame).save(tmp_path / "frames" / f"img_{i + 1:05d}.png")
    collate = Collator(processor, processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN))
    messages = [{"role": "user", "content": "<video>What is happening?"}, {"role": "assistant", "content": ACT_TOKEN}]
    samples = [Sample(path, messages, 0, "default", "a"), Sample(str(tmp_path / "frames"), messages, 0, "default", "b", 8)]
    dataset = VideoDataset(samples, VideoSettings(4, 8, None, 3136, 3136))
    from_video, from_folder = (collate([dataset[(i, 0, False)]]).inputs for i in (0, 1))
    assert from_video.keys() == from_folder.keys()
    for key in from_video:
        assert torch.equal(from_video[key], from_folder[key]), key
    assert from_video["second_per_grid_ts"].tolist() == [2 / 4]  # 2 frames per patch at video_fps 4


# ---------------------------------------------------------------------------------------------------
# early scaling matches the processor's own resize

@pytest.mark.parametrize("ext,fps,size", [(".avi", 25, (240, 320)), (".webm", 12, (240, 426)),
                                          (".mp4", 25, (180, 240))])
def test_scaling_in_the_decoder_matches_the_processor(tmp_path, processor, ext, fps, size):
    """decode_frames(size=...) scales inside FFmpeg's converter; the processor resizing full-size
    frames itself (torchvision bicubic, antialiased) must give the same grid and close pixels.
    Measured on these clips, in grey levels of 255: mean |difference| 1.2-2.3, 99th percentile 3-17,
    largest at colour edges. The gap is chroma: the reference upsamples the 4:2:0 colour planes by
    repetition to full-size RGB and then filters, the decoder filters them once from the planes; against
    the frames before encoding both are equally close (mean 2.1 vs 2.1 grey levels at 84x112)."""
    path = write_clip(tmp_path / f"clip{ext}", 12, fps, *size)
    info = probe_video(path)
    indices = list(range(0, 12, 2))
    full = decode_frames(path, indices)
    video_processor = processor.video_processor
    for min_pixels, max_pixels in [(3136, 12544), (3136, 65536)]:
        h, w = frame_size(info, min_pixels, max_pixels)
        assert (h, w) == smart_resize(size[0], size[1], 28, min_pixels, max_pixels)
        ours = decode_frames(path, indices, (h, w))
        assert ours.shape == (len(indices), h, w, 3)
        budget = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        ref = video_processor(videos=[full], size=budget, return_tensors="pt")
        out = video_processor(videos=[ours], size=budget, do_resize=False, return_tensors="pt")
        grid = [[len(indices) // 2, h // 14, w // 14]]
        assert out["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() == grid
        std = torch.tensor(video_processor.image_std).repeat_interleave(2 * 14 * 14)  # (C, T, P, P) rows
        diff = ((out["pixel_values_videos"] - ref["pixel_values_videos"]) * std).abs() * 255
        assert diff.mean() < 2.5, diff.mean()
        assert diff.quantile(0.99) <= 20, diff.quantile(0.99)


# ---------------------------------------------------------------------------------------------------
# cache

def test_cache_items_equal_uncached(tmp_path, videos, monkeypatch):
    cache = str(tmp_path / "cache")
    clip = write_clip(tmp_path / "clip.avi", 60, 25, 120, 160)
    paths = [clip, videos["webm_gops"][0], videos["mp4_open_gop"][0]]
    samples = [Sample(p, [], 0, "default", f"test:{i}") for i, p in enumerate(paths)]
    plain = VideoDataset(samples, VideoSettings(8.0, 16, None, 3136, 6272))
    cached = VideoDataset(samples, VideoSettings(8.0, 16, None, 3136, 6272, cache))
    keys = [(i, epoch, train) for i in range(len(paths)) for epoch, train in [(0, True), (1, True), (0, False)]]
    expected = {key: plain[key] for key in keys}
    for (i, _, _), item in expected.items():  # uncached items are decode_frames at the budget size
        size = frame_size(item.info, 3136, 6272)
        assert np.array_equal(item.frames, decode_frames(paths[i], item.indices, size))

    def check():
        for key in keys:
            a, b = expected[key], cached[key]
            assert np.array_equal(a.indices, b.indices) and a.info == b.info
            assert b.frames.dtype == np.uint8 and b.frames.flags.c_contiguous
            assert np.array_equal(a.frames, b.frames), key

    check()  # the first key of each clip writes its file, the others read it
    files = glob.glob(os.path.join(cache, "*", "*"))
    assert len(files) == len(paths) and all(f.endswith(".frames") for f in files)  # one per clip, no temp files

    def refuse(*args):
        raise AssertionError("a cache hit opened the video")
    monkeypatch.setattr(video, "_VideoFile", refuse)
    check()


def test_cache_survives_broken_files_and_concurrent_workers(tmp_path):
    cache = str(tmp_path / "cache")
    clip = write_clip(tmp_path / "clip.webm", 30, 12, 120, 160)
    settings = VideoSettings(4.0, 16, None, 3136, 6272, cache)
    # eight samples of one clip, two workers: they race to write the same file
    dataset = VideoDataset([Sample(clip, [], 0, "default", f"test:{i}") for i in range(8)], settings)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[(i, 0, True)] for i in range(8)],
                                         collate_fn=lambda items: items[0].frames, num_workers=2,
                                         timeout=120)  # a deadlocked worker fails instead of hanging
    expected = [VideoDataset(dataset.samples, VideoSettings(4.0, 16, None, 3136, 6272))[(i, 0, True)].frames
                for i in range(8)]
    for got, want in zip(loader, expected):
        assert np.array_equal(got, want)
    (file,) = glob.glob(os.path.join(cache, "*", "*"))
    assert file.endswith(".frames")
    # a truncated file (e.g. a copy cut short) is a miss and gets rewritten
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 1000)
    assert np.array_equal(dataset[(3, 0, True)].frames, expected[3])
    assert os.path.getsize(file) == size
