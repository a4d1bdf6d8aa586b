"""Tests of the dataset converters (prepare/ucf101.py, prepare/sthsthv2.py, prepare/records.py) on
official-format fixture trees with real tiny videos, plus compatibility with the peer IVCP files.

usage: pytest -q tests/test_prepare.py
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import prepare.sthsthv2  # noqa: E402
import prepare.ucf101  # noqa: E402
from prepare.records import ANSWERS, QUESTIONS, make_record  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
CODECS = {".avi": "mpeg4", ".webm": "libvpx-vp9"}  # what UCF101 and SSv2 ship


# -----------------------------------------------------------------------------
# helpers

def write_video(path, num_frames=4, size=32):
    """A real, decodable tiny video; the codec follows the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix], rate=4)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush


def write_crlf(path, lines, trailing_blank=True):
    # the official UCF101 lists are CRLF text, some with a blank last line
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n".join(lines) + "\r\n" + ("\r\n" if trailing_blank else "")).encode())


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def phrasing(record):
    return record["messages"][0]["content"], record["messages"][1]["content"]


# -----------------------------------------------------------------------------
# UCF101 fixture: 4 classes x 4 groups, split s tests on group TEST_GROUPS[s - 1] (as the real splits
# hold out groups 1-7, 8-14, 15-21) and trains on the rest.

UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups", "YoYo"]
GROUPS = [1, 8, 15, 22]
TEST_GROUPS = [1, 8, 15]


def ucf_clip(cls, group, clip=1):
    # the real quirk: folder HandstandPushups holds v_HandStandPushups_* files
    stem = "HandStandPushups" if cls == "HandstandPushups" else cls
    return f"{cls}/v_{stem}_g{group:02d}_c{clip:02d}.avi"


@pytest.fixture
def ucf_tree(tmp_path):
    root, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    for cls in UCF_CLASSES:
        for g in GROUPS:
            write_video(root / ucf_clip(cls, g))
    write_crlf(splits / "classInd.txt", [f"{i + 1} {cls}" for i, cls in enumerate(UCF_CLASSES)])
    for s, test_group in enumerate(TEST_GROUPS, start=1):
        train = [f"{ucf_clip(c, g)} {UCF_CLASSES.index(c) + 1}" for c in UCF_CLASSES for g in GROUPS if g != test_group]
        train[0] = f"  {train[0]}\t "  # stray whitespace must be tolerated
        write_crlf(splits / f"trainlist0{s}.txt", train)
        write_crlf(splits / f"testlist0{s}.txt", [ucf_clip(c, test_group) for c in UCF_CLASSES])
    return root, splits


def run_ucf(tree, out, *extra):
    root, splits = tree
    prepare.ucf101.main(["--root", str(root), "--splits", str(splits), "--out", str(out), *extra])


def test_records_phrasings_pair_up_as_in_peer_file():
    excerpt = json.loads((DATA / "ivcp_ucf101_excerpt.json").read_text())
    assert len(QUESTIONS) == len(ANSWERS) == 15
    assert {phrasing(r) for r in excerpt} == set(zip(QUESTIONS, ANSWERS))
    fixed = make_record("a/b.avi", None, None)
    assert phrasing(fixed) == (QUESTIONS[0], ANSWERS[0])
    assert "action_label" not in fixed and fixed["videos"] == ["a/b.avi"]
    assert make_record("a/b.avi", 3, random.Random(0))["action_label"] == 3


@pytest.mark.parametrize("split", [1, 2, 3])
def test_ucf101_counts_labels_paths(ucf_tree, tmp_path, capsys, split):
    root, _ = ucf_tree
    run_ucf(ucf_tree, tmp_path / "out", "--split", str(split))
    train, val = read_jsonl(tmp_path / "out/train.jsonl"), read_jsonl(tmp_path / "out/val.jsonl")
    assert json.loads((tmp_path / "out/classes.json").read_text()) == UCF_CLASSES
    test_group = TEST_GROUPS[split - 1]
    assert [r["videos"][0] for r in val] == [ucf_clip(c, test_group) for c in UCF_CLASSES]
    assert [r["videos"][0] for r in train] == [ucf_clip(c, g) for c in UCF_CLASSES for g in GROUPS if g != test_group]
    for r in train + val:
        video = r["videos"][0]
        assert not os.path.isabs(video) and (root / video).is_file()
        assert r["action_label"] == UCF_CLASSES.index(video.split("/")[0])
        assert r["messages"][0]["content"].startswith("<video>") and "<ACT>" in r["messages"][1]["content"]
    quirk = {r["videos"][0]: r["action_label"] for r in train + val}["HandstandPushups/v_HandStandPushups_g22_c01.avi"]
    assert quirk == UCF_CLASSES.index("HandstandPushups")
    assert f"video_root: {root.resolve()}" in capsys.readouterr().out


def test_ucf101_phrasings_reproducible(ucf_tree, tmp_path):
    for name, extra in [("a", []), ("b", ["--seed", "0"]), ("c", ["--seed", "1"]), ("fixed", ["--template", "fixed"])]:
        run_ucf(ucf_tree, tmp_path / name, *extra)
    for split in ["train.jsonl", "val.jsonl"]:
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert (tmp_path / "a/train.jsonl").read_bytes() != (tmp_path / "c/train.jsonl").read_bytes()
    varied = [phrasing(r) for r in read_jsonl(tmp_path / "a/train.jsonl")]
    assert len(set(varied)) > 1 and set(varied) <= set(zip(QUESTIONS, ANSWERS))
    fixed = {phrasing(r) for split in ["train", "val"] for r in read_jsonl(tmp_path / f"fixed/{split}.jsonl")}
    assert fixed == {(QUESTIONS[0], ANSWERS[0])}


def test_ucf101_missing_videos(ucf_tree, tmp_path, capsys):
    root, _ = ucf_tree
    gone = [ucf_clip("Archery", 22), ucf_clip("YoYo", 1)]  # one in trainlist01, one in testlist01
    for video in gone:
        (root / video).unlink()
    with pytest.raises(SystemExit, match="--allow-missing"):
        run_ucf(ucf_tree, tmp_path / "out")
    err = capsys.readouterr().err
    assert all(Path(v).name in err for v in gone)
    assert not (tmp_path / "out/train.jsonl").exists()  # nothing written on failure

    run_ucf(ucf_tree, tmp_path / "out", "--allow-missing")
    train, val = read_jsonl(tmp_path / "out/train.jsonl"), read_jsonl(tmp_path / "out/val.jsonl")
    assert (len(train), len(val)) == (11, 3)
    assert not {r["videos"][0] for r in train + val} & set(gone)


@pytest.mark.parametrize("list_name, bad_line, expected", [
    ("trainlist01.txt", ucf_clip("Archery", 8), "expected '<ClassName>/<file>.avi <class id>'"),
    ("trainlist01.txt", f"{ucf_clip('Archery', 8)} one", "expected '<ClassName>/<file>.avi <class id>'"),
    ("trainlist01.txt", f"{ucf_clip('Archery', 8)} 1", "disagrees with classInd.txt"),
    ("trainlist01.txt", "Juggling/v_Juggling_g08_c01.avi 1", "'Juggling' is not in classInd.txt"),
    ("testlist01.txt", f"{ucf_clip('Archery', 1)} 2", "expected one video path"),
    ("testlist01.txt", "v_Archery_g01_c01.avi", "expected a video path '<ClassName>/<file>.avi'"),
    ("classInd.txt", "Archery", "expected '<id> <ClassName>'"),
])
def test_ucf101_malformed_line_names_file_and_line(ucf_tree, tmp_path, list_name, bad_line, expected):
    path = ucf_tree[1] / list_name
    lines = path.read_bytes().decode().split("\r\n")
    lines[1] = bad_line  # line 2
    path.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(SystemExit) as e:
        run_ucf(ucf_tree, tmp_path / "out")
    assert f"{list_name}:2: " in str(e.value) and expected in str(e.value)


def test_peer_excerpt_labels_match_ucf101_converter(tmp_path):
    """The IVCP files (UCF101 split 1, paths "UCF101/<Class>/<file>.avi") and our converter agree on
    every clip's label when given the real classInd.txt.

    tests/data/ivcp_ucf101_excerpt.json: 30 records copied verbatim from IVCP's UCF101 files
    (3 train + 2 test clips of 6 classes, covering all 15 phrasings); tests/data/ucf101_classInd.txt:
    the real 101-class classInd, label -> class folder read off the full peer files."""
    excerpt = json.loads((DATA / "ivcp_ucf101_excerpt.json").read_text())
    root, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    splits.mkdir()
    shutil.copy(DATA / "ucf101_classInd.txt", splits / "classInd.txt")
    class_id = {line.split()[1]: int(line.split()[0]) for line in (splits / "classInd.txt").read_text().splitlines()}
    assert len(class_id) == 101

    write_video(tmp_path / "clip.avi")
    train, test = [], []
    for r in excerpt:
        video = r["videos"][0].removeprefix("UCF101/")
        (root / video).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "clip.avi", root / video)
        group = int(video.split("_g")[1][:2])
        if group <= 7:  # split 1 tests on groups 1-7 and trains on 8-25
            test.append(video)
        else:
            train.append(f"{video} {class_id[video.split('/')[0]]}")
    write_crlf(splits / "trainlist01.txt", train)
    write_crlf(splits / "testlist01.txt", test)

    prepare.ucf101.main(["--root", str(root), "--splits", str(splits), "--out", str(tmp_path / "out")])
    ours = {r["videos"][0]: r["action_label"]
            for split in ["train", "val"] for r in read_jsonl(tmp_path / f"out/{split}.jsonl")}
    assert len(ours) == len(excerpt) == 30 and len(test) == 12
    assert {"UCF101/" + v: label for v, label in ours.items()} == {r["videos"][0]: r["action_label"] for r in excerpt}
    assert len(json.loads((tmp_path / "out/classes.json").read_text())) == 101


# -----------------------------------------------------------------------------
# Something-Something v2 fixture. labels.json lists templates alphabetically, as the real file does,
# with ids NOT in alphabetical order, so a converter that re-numbers the templates gets them wrong.

SSV2_LABELS = {
    "Approaching something with your camera": "2",
    "Holding something next to something": "1",
    "Pushing something from left to right": "0",
    "Putting number of something onto something": "3",
}
SSV2_CLASSES = ["Pushing something from left to right", "Holding something next to something",
                "Approaching something with your camera", "Putting number of something onto something"]
SSV2_TEMPLATES = ["Approaching [something] with your camera", "Holding [something] next to [something]",
                  "Pushing [something] from left to right", "Putting [number of] [something] onto [something]"]


def ssv2_item(video_id, template):
    return {"id": str(video_id), "label": template.replace("[", "").replace("]", "").lower(),
            "template": template, "placeholders": ["potato"] * template.count("[")}


@pytest.fixture
def ssv2_tree(tmp_path):
    root, labels = tmp_path / "20bn-something-something-v2", tmp_path / "labels"
    labels.mkdir()
    splits = {
        "train.json": [ssv2_item(78687 + i, SSV2_TEMPLATES[i % 4]) for i in range(6)],
        "validation.json": [ssv2_item(1000 + i, SSV2_TEMPLATES[(i + 1) % 4]) for i in range(3)],
        "test.json": [{"id": str(5000 + i)} for i in range(3)],
    }
    (labels / "labels.json").write_text(json.dumps(SSV2_LABELS, indent=4))
    for name, items in splits.items():
        (labels / name).write_text(json.dumps(items))
        for item in items:
            write_video(root / f"{item['id']}.webm")
    return root, labels


def run_ssv2(tree, out, *extra):
    root, labels = tree
    prepare.sthsthv2.main(["--root", str(root), "--labels", str(labels), "--out", str(out), *extra])


def test_sthsthv2_official_ids_and_splits(ssv2_tree, tmp_path):
    root, labels = ssv2_tree
    run_ssv2(ssv2_tree, tmp_path / "out")
    assert json.loads((tmp_path / "out/classes.json").read_text()) == SSV2_CLASSES
    for split, name in [("train", "train.json"), ("val", "validation.json")]:
        items, records = json.loads((labels / name).read_text()), read_jsonl(tmp_path / f"out/{split}.jsonl")
        assert [r["videos"][0] for r in records] == [f"{item['id']}.webm" for item in items]
        expected = [int(SSV2_LABELS[item["template"].replace("[", "").replace("]", "")]) for item in items]
        assert [r["action_label"] for r in records] == expected
    test = read_jsonl(tmp_path / "out/test.jsonl")
    assert len(test) == 3 and all("action_label" not in r for r in test)
    for split in ["train", "val", "test"]:
        for r in read_jsonl(tmp_path / f"out/{split}.jsonl"):
            assert not os.path.isabs(r["videos"][0]) and (root / r["videos"][0]).is_file()

    run_ssv2(ssv2_tree, tmp_path / "again")  # same default seed -> same files
    for split in ["train", "val", "test"]:
        assert (tmp_path / f"out/{split}.jsonl").read_bytes() == (tmp_path / f"again/{split}.jsonl").read_bytes()


def test_sthsthv2_unknown_template_names_record(ssv2_tree, tmp_path):
    path = ssv2_tree[1] / "train.json"
    items = json.loads(path.read_text())
    items[1]["template"] = "Spinning [something] that quickly stops spinning"
    path.write_text(json.dumps(items))
    with pytest.raises(SystemExit) as e:
        run_ssv2(ssv2_tree, tmp_path / "out")
    message = str(e.value)
    assert "train.json" in message and "record 1" in message and items[1]["id"] in message
    assert "Spinning [something] that quickly stops spinning" in message


def test_sthsthv2_label_ids_must_be_contiguous(ssv2_tree, tmp_path):
    (ssv2_tree[1] / "labels.json").write_text(json.dumps({**SSV2_LABELS, "Putting number of something onto something": "4"}))
    with pytest.raises(SystemExit, match=r"labels\.json: ids must be 0\.\.3"):
        run_ssv2(ssv2_tree, tmp_path / "out")


def test_sthsthv2_missing_videos(ssv2_tree, tmp_path, capsys):
    (ssv2_tree[0] / "5001.webm").unlink()
    with pytest.raises(SystemExit, match="--allow-missing"):
        run_ssv2(ssv2_tree, tmp_path / "out")
    assert "5001.webm" in capsys.readouterr().err
    run_ssv2(ssv2_tree, tmp_path / "out", "--allow-missing")
    assert [r["videos"][0] for r in read_jsonl(tmp_path / "out/test.jsonl")] == ["5000.webm", "5002.webm"]


def test_converters_run_as_scripts_from_repo_root(ucf_tree, ssv2_tree, tmp_path):
    # `python prepare/x.py` puts prepare/ (not the repo root) on sys.path: the records import must still work
    for script, args in [("prepare/ucf101.py", ["--root", ucf_tree[0], "--splits", ucf_tree[1]]),
                         ("prepare/sthsthv2.py", ["--root", ssv2_tree[0], "--labels", ssv2_tree[1]])]:
        out = tmp_path / Path(script).stem
        result = subprocess.run([sys.executable, script, *map(str, args), "--out", str(out)],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "video_root:" in result.stdout and (out / "classes.json").is_file()
