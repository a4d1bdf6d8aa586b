"""A frame folder is a video: the same clip as a video file and as a folder of images gives the same
sampled indices, the same frames (exactly for PNG; JPEG within its compression error), the same model
inputs and timing; bad folders are named, all at once."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import video
from data import EntryRules, VideoDataset, load_samples
from model import ACT_TOKEN
from prepare.synthetic import make_clip, write_video
from video import DataError, VideoSettings, decode_frames, load_sampled, probe_video, read_frame

FPS = 8
MESSAGES = [{"role": "user", "content": "<video>What is happening?"},
            {"role": "assistant", "content": f"It is {ACT_TOKEN}."}]


def write_folder(folder, frames, name="img_{:05d}.png", first=1, **save):
    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, name.format(i + first)), **save)
    return str(folder)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 56x56 synthetic clip as an .mp4, and its decoded frames written as a PNG and a JPEG folder."""
    root = tmp_path_factory.mktemp("clip")
    path = str(root / "clip.mp4")
    write_video(path, make_clip(3, np.random.default_rng(0), 56, 16), FPS)
    frames = decode_frames(path, range(16))
    return {"video": path, "frames": frames, "png": write_folder(root / "png", frames),
            "jpg": write_folder(root / "jpg", frames, "{:05d}.jpg", quality=95)}


@pytest.mark.parametrize("rng_seed", [None, 1])  # evaluation centres, training offsets
def test_same_clip_as_video_and_as_frame_folder(clip, rng_seed):
    settings = VideoSettings(4, 8, None, 3136, 3136)  # 56x56: the frames' own size, no scaling
    rng = (lambda: np.random.default_rng(rng_seed)) if rng_seed is not None else (lambda: None)
    info, indices, frames = load_sampled(clip["video"], settings, rng())
    for kind in ("png", "jpg"):
        f_info, f_indices, f_frames = load_sampled(clip[kind], settings, rng(), fps=FPS)
        assert (f_info.num_frames, f_info.fps, f_info.width, f_info.height) == (16, FPS, 56, 56) == \
            (info.num_frames, info.fps, info.width, info.height)
        assert f_indices.tolist() == indices.tolist()
        difference = np.abs(f_frames.astype(int) - frames).max()
        print(f"{kind}: indices {indices.tolist()}, max abs difference {difference}")
        if kind == "png":
            assert np.array_equal(f_frames, frames)
        else:  # JPEG quality 95, 4:2:0 chroma (PIL's default), measured here: max 16, mean 2.25
            assert difference <= 24 and np.abs(f_frames.astype(int) - frames).mean() < 3


def test_scaled_frames_and_cache(clip, tmp_path):
    """Scaling runs through the same swscale bicubic as a video's (from RGB rather than YUV, so not
    bit-equal); the frame cache changes nothing."""
    settings = VideoSettings(4, 8, None, 784, 784)  # 56 -> 28
    frames = load_sampled(clip["video"], settings)[2]
    folder = load_sampled(clip["png"], settings, fps=FPS)[2]
    difference = np.abs(folder.astype(int) - frames)
    print(f"scaled 56 -> 28: PNG folder vs video max abs difference {difference.max()}, mean {difference.mean():.2f}")
    assert folder.shape == frames.shape and difference.mean() < 3
    cached = VideoSettings(4, 8, None, 784, 784, video_cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # written, then read
        info, indices, hit = load_sampled(clip["png"], cached, fps=FPS)
        assert np.array_equal(hit, folder) and info.fps == FPS


def test_jpeg_dct_scaling_against_a_full_decode(tmp_path):
    """A JPEG whose target is at most half its size is decoded at 1/2..1/8 scale (Image.draft) and
    scaled the rest of the way: close to decoding it whole and scaling that."""
    big = make_clip(0, np.random.default_rng(1), 448, 2)[0]
    file = str(tmp_path / "f.jpg")
    Image.fromarray(big).save(file, quality=95)
    with Image.open(file) as image:
        image.draft("RGB", (112, 112))
        assert image.size == (112, 112)  # the decoder's 1/4 scale
    drafted = read_frame(file, (112, 112))
    whole = video._Converter((112, 112))(video.av.VideoFrame.from_ndarray(np.asarray(Image.open(file).convert("RGB")),
                                                                          format="rgb24"))
    print(f"DCT-scaled vs full decode + bicubic: max abs difference {np.abs(drafted.astype(int) - whole).max()}, "
          f"mean {np.abs(drafted.astype(int) - whole).mean():.2f}")
    assert drafted.shape == whole.shape and np.abs(drafted.astype(int) - whole).mean() < 3


def test_natural_order_names_and_rawframes(tmp_path):
    """Numbers, not strings, order the frames (frame_2 before frame_10); rawframes' flow images are
    passed over for the img_ series."""
    frames = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(12)])
    plain = write_folder(tmp_path / "plain", frames, "frame_{}.png", first=0)
    assert [decode_frames(plain, [i])[0, 0, 0, 0] for i in (1, 2, 10)] == [10, 20, 100]
    raw = write_folder(tmp_path / "raw", frames, "img_{:05d}.jpg", quality=100)
    write_folder(raw, frames[:3] * 0, "flow_x_{:05d}.jpg")
    write_folder(raw, frames[:3] * 0, "flow_y_{:05d}.jpg")
    assert probe_video(raw, 30).num_frames == 12
    assert abs(int(decode_frames(raw, [11])[0, 4, 4, 0]) - 110) <= 2


def test_bad_frame_folders_are_named(tmp_path):
    frames = np.zeros((5, 8, 8, 3), np.uint8)
    gap = write_folder(tmp_path / "gap", frames)
    os.remove(os.path.join(gap, "img_00003.png"))
    with pytest.raises(DataError, match=r"gap/img_00003\.png: frame missing .*between img_00002\.png and img_00004"):
        probe_video(gap, 8)
    mixed = write_folder(tmp_path / "mixed", frames)
    write_folder(mixed, frames, "x{}.png")
    with pytest.raises(DataError, match="mixes 2 series"):
        probe_video(mixed, 8)
    broken = write_folder(tmp_path / "broken", frames)
    open(os.path.join(broken, "img_00004.png"), "wb").write(b"not a png")
    with pytest.raises(DataError, match=r"broken/img_00004\.png: cannot read the frame"):
        decode_frames(broken, [0, 3])
    resized = write_folder(tmp_path / "resized", frames)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(os.path.join(resized, "img_00002.png"))
    with pytest.raises(DataError, match=r"img_00002\.png: frame is 8x6, the folder's first frame 8x8"):
        decode_frames(resized, [1])
    with pytest.raises(DataError, match="no frame rate of its own; give it as `fps` in the record, or as `frame_fps`"):
        load_sampled(mixed.replace("mixed", "broken"), VideoSettings(4, 8, None, 64, 64))


def test_records_of_frame_folders(tmp_path):
    """The record's fps, else the entry's frame_fps; a folder with neither, or with a gap, is a problem
    of the records file, reported with the others, file:line each."""
    frames = np.zeros((6, 8, 8, 3), np.uint8)
    good, gap = write_folder(tmp_path / "good", frames), write_folder(tmp_path / "gap", frames)
    os.remove(os.path.join(gap, "img_00002.png"))
    lines = [{"messages": MESSAGES, "videos": ["good"], "action_label": 0, "fps": 25},
             {"messages": MESSAGES, "videos": ["good"], "action_label": 1},
             {"messages": MESSAGES, "videos": ["gap"], "action_label": 1, "fps": 25},
             {"messages": MESSAGES, "videos": ["good"], "action_label": 9, "fps": "fast"}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError) as e:
        load_samples(str(path), None, 6)
    message = str(e.value)
    assert message.startswith("4 problem(s) in")
    assert f"{path}:2: video {good} is a frame folder, which has no frame rate of its own" in message
    assert f"{path}:3: {gap}/img_00002.png: frame missing" in message
    assert f"{path}:4: `action_label` 9 is outside [0, 6)" in message and "`fps` must be a positive number" in message
    path.write_text("".join(json.dumps(r) + "\n" for r in lines[:2]))
    samples, bad = load_samples(str(path), None, 6, rules=EntryRules(frame_fps=12.5))
    assert [s.fps for s in samples] == [25, 12.5] and not bad
    assert data.sample_lengths(VideoDataset(samples, VideoSettings(4, 8, None, 784, 784))).tolist() == [1, 1]
