"""Tests of the dataset converters prepare/kinetics.py, hmdb51.py, mmaction.py and folders.py, and of
configs/kinetics400.yaml and hmdb51.yaml, on small trees in each dataset's official layout. The
converters only check that a clip exists, so empty placeholder files stand in for the videos (no
encoding, no decoding: the whole file runs in a few seconds).

usage: pytest -q tests/test_converters.py
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import prepare.folders  # noqa: E402
import prepare.hmdb51  # noqa: E402
import prepare.kinetics  # noqa: E402
import prepare.mmaction  # noqa: E402


# -----------------------------------------------------------------------------
# helpers

def touch(path, data=b""):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def written(out):
    """{split: [(video, label or None)]} of out/train.jsonl, val.jsonl (and test.jsonl when written)."""
    return {split: [(r["videos"][0], r.get("action_label")) for r in read_jsonl(out / f"{split}.jsonl")]
            for split in ["train", "val", "test"] if (out / f"{split}.jsonl").exists()}


def classes(out):
    return json.loads((out / "classes.json").read_text())


def system_exit(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value)


# -----------------------------------------------------------------------------
# Kinetics: official CSVs (label,youtube_id,time_start,time_end,split) and clips named
# <youtube_id>_<start:06d>_<end:06d>.mp4. The labels have spaces, and their CSV order is not sorted.

K_CLASSES = ["zumba", "abseiling", "passing American football (in game)"]
K_SORTED = sorted(K_CLASSES)
K_COUNTS = {"train": 4, "val": 2}  # clips per class


def k_rows(split):
    """[(label, youtube_id, start, end)]: made-up ids in the real 11-character alphabet, some
    starting with "-" as real ones do; a start past 999 s checks the 6-digit padding."""
    start = [0, 10, 20, 1030]
    return [(label, f"-{split[0]}{c}x{i}_AbCd9", start[i], start[i] + 10)
            for c, label in enumerate(K_CLASSES) for i in range(K_COUNTS[split])]


def k_clip(row):
    return f"{row[1]}_{row[2]:06d}_{row[3]:06d}.mp4"


def write_k_csv(path, rows, split, header=("label", "youtube_id", "time_start", "time_end", "split"), extra=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)  # quotes the labels that need it, as the official files do
        w.writerow([*header, *extra])
        for label, youtube_id, start, end in rows:
            values = {"label": label, "youtube_id": youtube_id, "time_start": start, "time_end": end,
                      "split": split, "is_cc": 0}
            w.writerow([values[name] for name in (*header, *extra)])


def make_kinetics(root, layout, val_folder="val"):
    """layout: "flat" (root/train/<clip>), "classes" (root/train/<label>/<clip>) or "underscores"
    (class folders with "_" for spaces, as some download scripts write them)."""
    for split, folder in [("train", "train"), ("val", val_folder)]:
        for row in k_rows(split):
            sub = {"flat": "", "classes": row[0], "underscores": row[0].replace(" ", "_")}[layout]
            touch(root / folder / sub / k_clip(row))


@pytest.fixture
def kinetics(tmp_path):
    root = tmp_path / "kinetics400"
    write_k_csv(root / "annotations/train.csv", k_rows("train"), "train")
    write_k_csv(root / "annotations/validate.csv", k_rows("val"), "val")
    return root


@pytest.mark.parametrize("layout", ["flat", "classes", "underscores"])
def test_kinetics_layouts_labels_and_missing(kinetics, tmp_path, capsys, layout):
    make_kinetics(kinetics, layout)
    train_rows, val_rows = k_rows("train"), k_rows("val")
    gone = [train_rows[5], val_rows[0]]  # one clip of each split, as a partial download lacks them
    for row in gone:
        next((kinetics / ("train" if row in train_rows else "val")).rglob(k_clip(row))).unlink()

    out = tmp_path / "out"
    prepare.kinetics.main(["--root", str(kinetics), "--out", str(out)])
    assert classes(out) == K_SORTED
    splits = written(out)
    assert len(splits["train"]) == len(train_rows) - 1 and len(splits["val"]) == len(val_rows) - 1
    for split, rows in [("train", train_rows), ("val", val_rows)]:
        expected = [(k_clip(r), K_SORTED.index(r[0])) for r in rows if r not in gone]
        assert [(Path(v).name, label) for v, label in splits[split]] == expected
        for video, _ in splits[split]:
            assert video.startswith(f"{split}/") and (kinetics / video).is_file()
    folder = {"flat": "train", "classes": "train/passing American football (in game)",
              "underscores": "train/passing_American_football_(in_game)"}[layout]
    assert Path(splits["train"][-1][0]).parent == Path(folder)
    assert "-t0x3_AbCd9_001030_001040.mp4" in {Path(v).name for v, _ in splits["train"]}

    missing = [line.split("\t") for line in (out / "missing.txt").read_text().splitlines()]
    assert missing == [["train", k_clip(gone[0]), gone[0][0], "train.csv:7"],
                       ["val", k_clip(gone[1]), gone[1][0], "validate.csv:2"]]
    printed = capsys.readouterr().out
    assert "train.csv: 12 clips listed, 11 found, 1 missing" in printed
    assert "validate.csv: 6 clips listed, 5 found, 1 missing" in printed
    assert f"{out / 'missing.txt'}: 2 of 18 listed clips not found" in printed
    assert f"wrote {out / 'train.jsonl'}: 11 records" in printed and f"video_root: {kinetics.resolve()}" in printed


def test_kinetics700_2020_columns_val_csv_validate_folder_and_test(tmp_path, capsys):
    # Kinetics-700-2020: an extra is_cc column, here with the columns in another order too; val.csv in
    # an --annotations folder elsewhere; a validate/ folder; a test.csv without labels
    root, notes = tmp_path / "k700", tmp_path / "notes"
    header = ("youtube_id", "label", "time_end", "time_start", "split")
    write_k_csv(notes / "train.csv", k_rows("train"), "train", header, extra=("is_cc",))
    write_k_csv(notes / "val.csv", k_rows("val"), "val", header, extra=("is_cc",))
    test_rows = [(None, f"test{i}_AbCd9", 0, 10) for i in range(3)]
    write_k_csv(notes / "test.csv", test_rows, "test", ("youtube_id", "time_start", "time_end", "split"))
    make_kinetics(root, "flat", val_folder="validate")
    for row in test_rows:
        touch(root / "test" / k_clip(row))

    out = tmp_path / "out"
    prepare.kinetics.main(["--root", str(root), "--annotations", str(notes), "--out", str(out), "--template", "fixed"])
    splits = written(out)
    assert [len(splits[s]) for s in ["train", "val", "test"]] == [12, 6, 3]
    assert splits["val"][0] == (f"validate/{k_clip(k_rows('val')[0])}", K_SORTED.index("zumba"))
    assert splits["test"] == [(f"test/{k_clip(r)}", None) for r in test_rows]
    assert (out / "missing.txt").read_text() == ""
    assert "0 of 21 listed clips not found" in capsys.readouterr().out


def test_kinetics_bad_rows_reported_together(kinetics, tmp_path):
    make_kinetics(kinetics, "flat")
    train = kinetics / "annotations/train.csv"
    lines = train.read_text().splitlines()
    lines[2] = lines[2].replace(",10,20,", ",1O,20,")  # line 3: letter O for a zero
    lines[4] = "abseiling,onlyfour,0,10"  # line 5: a column short
    train.write_text("\n".join(lines) + "\n")
    val = kinetics / "annotations/validate.csv"
    lines = val.read_text().splitlines()
    lines[1] = lines[1].replace("zumba", "salsa dancing")  # line 2: not a train class
    val.write_text("\n".join(lines) + "\n")

    message = system_exit(prepare.kinetics.main, ["--root", str(kinetics), "--out", str(tmp_path / "out")])
    assert message.startswith("3 problems")
    assert f"{train}:3: time not a whole number of seconds: time_start='1O'" in message
    assert f"{train}:5: 4 columns where the header has 5" in message
    assert f"{val}:2: label 'salsa dancing' is not a class of train.csv" in message
    assert not (tmp_path / "out").exists()


def test_kinetics_wrong_root_is_an_error_not_all_missing(kinetics, tmp_path):
    (kinetics / "train").mkdir()
    (kinetics / "val").mkdir()  # the folders exist, the clips are elsewhere
    message = system_exit(prepare.kinetics.main, ["--root", str(kinetics), "--out", str(tmp_path / "out")])
    assert "none of the 12 clips" in message and "check --root" in message


# -----------------------------------------------------------------------------
# HMDB51: testTrainMulti_7030_splits/<class>_test_split<k>.txt, "<clip>.avi <id> " per line (with
# the real files' trailing space), 1 = train, 2 = test, 0 = unused; a clip's id differs per split.

H_CLASSES = ["ride_bike", "brush_hair", "cartwheel"]  # sorted: brush_hair, cartwheel, ride_bike
H_IDS = [1, 1, 2, 0, 1, 2]  # split k gives clip j the id H_IDS[(j + k) % 6]


def h_clip(cls, j):
    return f"{cls}_clip_u_cm_np1_fr_med_{j}.avi"


def h_id(j, k):
    return H_IDS[(j + k) % len(H_IDS)]


@pytest.fixture
def hmdb(tmp_path):
    root, lists = tmp_path / "hmdb51_org", tmp_path / "testTrainMulti_7030_splits"
    lists.mkdir()
    for cls in H_CLASSES:
        for j in range(len(H_IDS)):
            touch(root / cls / h_clip(cls, j))
        for k in (1, 2, 3):
            (lists / f"{cls}_test_split{k}.txt").write_text("".join(f"{h_clip(cls, j)} {h_id(j, k)} \n"
                                                                     for j in range(len(H_IDS))))
    return root, lists


def run_hmdb(hmdb, out, *extra):
    prepare.hmdb51.main(["--root", str(hmdb[0]), "--splits", str(hmdb[1]), "--out", str(out), *extra])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hmdb51_splits_select_ids(hmdb, tmp_path, capsys, k):
    out = tmp_path / "out"
    run_hmdb(hmdb, out, "--split", str(k))
    assert classes(out) == sorted(H_CLASSES)
    splits = written(out)
    for split, wanted in [("train", 1), ("val", 2)]:
        assert splits[split] == [(f"{cls}/{h_clip(cls, j)}", label) for label, cls in enumerate(sorted(H_CLASSES))
                                 for j in range(len(H_IDS)) if h_id(j, k) == wanted]
    assert (len(splits["train"]), len(splits["val"])) == (9, 6)
    printed = capsys.readouterr().out
    assert "train.jsonl: 9 records" in printed and f"video_root: {hmdb[0].resolve()}" in printed


def test_hmdb51_bad_lines_reported_together_and_missing_clips(hmdb, tmp_path, capsys):
    root, lists = hmdb
    (root / "cartwheel" / h_clip("cartwheel", 0)).unlink()  # train in split 1
    with pytest.raises(SystemExit, match="--allow-missing"):
        run_hmdb(hmdb, tmp_path / "out")
    assert h_clip("cartwheel", 0) in capsys.readouterr().err
    run_hmdb(hmdb, tmp_path / "out", "--allow-missing")
    assert [len(s) for s in written(tmp_path / "out").values()] == [8, 6]

    bad = {"brush_hair": (2, f"{h_clip('brush_hair', 1)} 3 "), "ride_bike": (4, h_clip("ride_bike", 3))}
    for cls, (n, line) in bad.items():
        path = lists / f"{cls}_test_split1.txt"
        lines = path.read_text().splitlines()
        lines[n - 1] = line
        path.write_text("\n".join(lines) + "\n")
    message = system_exit(prepare.hmdb51.main,
                          ["--root", str(root), "--splits", str(lists), "--out", str(tmp_path / "x")])
    assert f"{lists / 'brush_hair_test_split1.txt'}:2: expected '<clip>.avi <0|1|2>'" in message
    assert f"{lists / 'ride_bike_test_split1.txt'}:4: expected '<clip>.avi <0|1|2>'" in message


# -----------------------------------------------------------------------------
# mmaction2 lists: videos "path label", rawframes "frame_dir total_frames label", labels 0-based.

MM_NAMES = ["archery", "bowling", "cooking"]


@pytest.fixture
def mm_videos(tmp_path):
    train_root, val_root = tmp_path / "videos_train", tmp_path / "videos_val"
    train = [(f"{MM_NAMES[i % 3]}/clip{i}.mp4", i % 3) for i in range(7)]
    val = [(f"{MM_NAMES[i % 3]}/v{i}.mp4", i % 3) for i in range(4)]
    for root, entries in [(train_root, train), (val_root, val)]:
        for path, _ in entries:
            touch(root / path)
    (tmp_path / "train_list_videos.txt").write_text("".join(f"{p} {label}\n" for p, label in train))
    (tmp_path / "val_list_videos.txt").write_text("".join(f"{p} {label}\n" for p, label in val))
    (tmp_path / "label_map.txt").write_text("\n".join(MM_NAMES) + "\n")
    return tmp_path, train, val


def mm_args(tmp, out, kind="videos", val_root=True):
    args = ["--train_list", str(tmp / f"train_list_{kind}.txt"), "--val_list", str(tmp / f"val_list_{kind}.txt"),
            "--root", str(tmp / f"{kind}_train"), "--out", str(out)]
    return args + (["--val_root", str(tmp / f"{kind}_val")] if val_root else [])


def test_mmaction_videos_with_names_and_val_root(mm_videos, capsys):
    tmp, train, val = mm_videos
    out = tmp / "out"
    prepare.mmaction.main(mm_args(tmp, out) + ["--classes", str(tmp / "label_map.txt")])
    assert classes(out) == MM_NAMES
    assert written(out) == {"train": train, "val": val}
    assert all("fps" not in r for r in read_jsonl(out / "train.jsonl"))
    printed = capsys.readouterr().out
    assert f"video_root: {(tmp / 'videos_train').resolve()}" in printed
    assert f"video_root: {(tmp / 'videos_val').resolve()}" in printed

    # no --classes: the names are the label numbers
    prepare.mmaction.main(mm_args(tmp, tmp / "numbers"))
    assert classes(tmp / "numbers") == ["0", "1", "2"]


def test_mmaction_rawframes_frame_folders_and_fps(tmp_path, capsys):
    root = tmp_path / "rawframes"
    train = [(f"clip{i}", 5 + i, i % 2) for i in range(4)]
    for folder, frames, _ in train:
        for f in range(1, frames + 1):
            touch(root / folder / f"img_{f:05d}.jpg")
    (tmp_path / "train_list_rawframes.txt").write_text("".join(f"{d} {n} {label}\n" for d, n, label in train))
    (tmp_path / "val_list_rawframes.txt").write_text("clip3 8 1\n")
    args = ["--train_list", str(tmp_path / "train_list_rawframes.txt"), "--val_list",
            str(tmp_path / "val_list_rawframes.txt"), "--root", str(root)]

    prepare.mmaction.main(args + ["--out", str(tmp_path / "a")])  # format auto-detected from 3 columns
    assert written(tmp_path / "a") == {"train": [(d, label) for d, _, label in train], "val": [("clip3", 1)]}
    assert all("fps" not in r for r in read_jsonl(tmp_path / "a/train.jsonl"))
    assert "frame folders have no fps: give the frame rate as frame_fps in the dataset entry" in capsys.readouterr().out
    prepare.mmaction.main(args + ["--out", str(tmp_path / "b"), "--frame_fps", "30", "--format", "rawframes"])
    assert {r["fps"] for r in read_jsonl(tmp_path / "b/train.jsonl") + read_jsonl(tmp_path / "b/val.jsonl")} == {30.0}

    (root / "clip1.mp4").write_bytes(b"x")  # a file where a frame folder belongs counts as missing
    (tmp_path / "val_list_rawframes.txt").write_text("clip1.mp4 8 1\n")
    with pytest.raises(SystemExit, match="--allow-missing"):
        prepare.mmaction.main(args + ["--out", str(tmp_path / "c")])


def test_mmaction_bad_lines_reported_together(mm_videos):
    tmp, _, _ = mm_videos
    message = system_exit(prepare.mmaction.main, mm_args(tmp, tmp / "out") + ["--frame_fps", "25"])
    assert message.startswith("--frame_fps: only for rawframes lists")

    train_list, val_list = tmp / "train_list_videos.txt", tmp / "val_list_videos.txt"
    lines = train_list.read_text().splitlines()
    lines[1] = "bowling/clip1.mp4 1 2"  # line 2: a multi-label line
    lines[3] = "archery/clip3.mp4 first"  # line 4: not a class id
    train_list.write_text("\n".join(lines) + "\n")
    val_list.write_text(val_list.read_text() + "cooking/v9.mp4 3\n")  # line 5: outside the 3 names
    message = system_exit(prepare.mmaction.main, mm_args(tmp, tmp / "out") + ["--classes", str(tmp / "label_map.txt")])
    assert message.startswith("3 problems")
    assert f"{train_list}:2: expected '<path> <label>'" in message and "multi-label" in message
    assert f"{train_list}:4: label 'first' is not a class id" in message
    assert f"{val_list}:5: label 3 is outside the 3 classes of {tmp / 'label_map.txt'}" in message


# -----------------------------------------------------------------------------
# folders.py: <root>/<class>/<clip>, videos and frame folders, a stratified val draw per class.

F_CLIPS = {"Jumping": 10, "Running": 5, "Waving": 2}  # val at 0.2: 2, 1 and 1 clips (at least 1, never all)


def make_folders(root, clips=F_CLIPS, prefix="c"):
    """The clips (a mix of extensions in any case, and one frame folder per class) plus what must be
    skipped; returns {class: [clip paths relative to root]}."""
    tree = {}
    for cls, n in clips.items():
        tree[cls] = []
        for i in range(n):
            if i == 0:
                name = f"{prefix}{i}_frames"
                for f in range(3):
                    touch(root / cls / name / f"{f:04d}.JPG", b"jpeg")
            else:
                name = f"{prefix}{i}" + [".mp4", ".AVI", ".webm", ".mkv", ".MOV"][i % 5]
                touch(root / cls / name, b"video")
            tree[cls].append(f"{cls}/{name}")
    return tree


def test_folders_stratified_deterministic_frame_folders_and_skipped(tmp_path, capsys):
    root = tmp_path / "clips"
    tree = make_folders(root)
    skip = {"Jumping/notes.txt": b"text", "Jumping/empty.mp4": b"", "Running/.DS_Store": b"x",
            "Running/no_frames/.keep": b"", "Waving/mixed/0001.jpg": b"jpeg", "Waving/mixed/info.json": b"{}"}
    for path, data in skip.items():
        touch(root / path, data)

    def run(name, *extra):
        prepare.folders.main(["--root", str(root), "--out", str(tmp_path / name), "--val_fraction", "0.2", *extra])
        return written(tmp_path / name)

    a = run("a")
    assert classes(tmp_path / "a") == sorted(F_CLIPS)
    for label, cls in enumerate(sorted(F_CLIPS)):  # stratified: each class split on its own
        train = [v for v, lab in a["train"] if lab == label]
        val = [v for v, lab in a["val"] if lab == label]
        assert sorted(train + val) == sorted(tree[cls]) and not set(train) & set(val)
        assert len(val) == {"Jumping": 2, "Running": 1, "Waving": 1}[cls]
    assert "Jumping/c0_frames" in {v for v, _ in a["train"] + a["val"]}  # a frame folder is a clip
    assert run("again", "--seed", "0") == a
    assert (tmp_path / "a/val.jsonl").read_bytes() == (tmp_path / "again/val.jsonl").read_bytes()
    assert any(run(f"seed{s}", "--seed", str(s))["val"] != a["val"] for s in (1, 2, 3))
    for i in range(10, 15):  # one class gains clips (and a val clip): the other classes' draws stay put
        touch(root / f"Jumping/c{i}.mp4", b"video")
    grown = run("grown")
    assert len(grown["val"]) == len(a["val"]) + 1
    assert [c for c in grown["val"] if c[1] > 0] == [c for c in a["val"] if c[1] > 0]

    skipped = dict(line.split("\t") for line in (tmp_path / "a/skipped.txt").read_text().splitlines())
    reasons = {str(Path(p).relative_to(root)): reason for p, reason in skipped.items()}
    assert set(reasons) == {"Jumping/notes.txt", "Jumping/empty.mp4", "Running/.DS_Store", "Running/no_frames",
                            "Waving/mixed"}
    assert reasons["Jumping/notes.txt"].startswith("not a video") and reasons["Jumping/empty.mp4"] == "empty file"
    assert reasons["Running/no_frames"] == "empty frame folder" and "info.json" in reasons["Waving/mixed"]
    captured = capsys.readouterr()
    assert "skipped 5 entries that are not clips" in captured.err and "Jumping/notes.txt: not a video" in captured.err
    assert f"wrote {tmp_path / 'a/train.jsonl'}: 13 records" in captured.out


def test_folders_frame_fps_and_frame_gaps(tmp_path, capsys):
    """--frame_fps goes into the frame folders' records only (a video file has its own rate); a frame
    folder with a gap in its numbers is skipped with the missing frame named."""
    root = tmp_path / "clips"
    make_folders(root, {"a": 2, "b": 2})
    for f in (1, 2, 4):
        touch(root / "a" / "gap" / f"img_{f:05d}.jpg", b"jpeg")
    args = ["--root", str(root), "--val_fraction", "0.5"]
    prepare.folders.main(args + ["--out", str(tmp_path / "fps"), "--frame_fps", "12"])
    records = read_jsonl(tmp_path / "fps/train.jsonl") + read_jsonl(tmp_path / "fps/val.jsonl")
    assert {(r["videos"][0], r.get("fps")) for r in records} == {
        ("a/c0_frames", 12.0), ("b/c0_frames", 12.0), ("a/c1.AVI", None), ("b/c1.AVI", None)}
    skipped = (tmp_path / "fps/skipped.txt").read_text()
    assert "gap\tframe folder that cannot be read as a clip (" in skipped and "img_00003.jpg: frame missing" in skipped
    capsys.readouterr()
    prepare.folders.main(args + ["--out", str(tmp_path / "no_fps")])
    assert "2 clip(s) are frame folders, whose records have no fps: give the frame rate as frame_fps" in \
        capsys.readouterr().out


def test_folders_val_root(tmp_path, capsys):
    train_tree = make_folders(tmp_path / "train", {"b": 3, "a": 2})
    val_tree = make_folders(tmp_path / "val", {"b": 1, "a": 2}, prefix="v")
    args = ["--root", str(tmp_path / "train"), "--val_root", str(tmp_path / "val")]
    prepare.folders.main(args + ["--out", str(tmp_path / "out")])
    assert classes(tmp_path / "out") == ["a", "b"]
    assert written(tmp_path / "out") == {split: [(v, 0) for v in tree["a"]] + [(v, 1) for v in tree["b"]]
                                         for split, tree in [("train", train_tree), ("val", val_tree)]}
    assert f"video_root: {(tmp_path / 'val').resolve()}" in capsys.readouterr().out

    (tmp_path / "val/c").mkdir()  # a class the train tree lacks, and empty too
    message = system_exit(prepare.folders.main, args + ["--out", str(tmp_path / "bad")])
    assert f"{tmp_path / 'val/c'}: class folder with no clips" in message
    assert f"{tmp_path / 'val/c'}: class folder not in --root" in message


def test_folders_class_without_clips_is_an_error(tmp_path):
    root = tmp_path / "clips"
    make_folders(root, {"a": 2, "b": 2})
    touch(root / "c/readme.txt", b"no clips here")
    message = system_exit(prepare.folders.main, ["--root", str(root), "--out", str(tmp_path / "out")])
    assert message == (f"{root / 'c'}: class folder with no clips (a video file or a folder of images); "
                       f"add clips or remove the folder")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# configs and the command lines

@pytest.mark.parametrize("name, num_classes, script", [("kinetics400", 400, "prepare/kinetics.py"),
                                                       ("hmdb51", 51, "prepare/hmdb51.py")])
def test_configs(name, num_classes, script):
    import config
    cfg = config.validated_config(config.read_yaml(REPO / "configs" / f"{name}.yaml"), name)
    ucf = config.validated_config(config.read_yaml(REPO / "configs/ucf101.yaml"), "ucf101")
    assert cfg.num_action_classes == num_classes and cfg.output_dir == f"runs/{name}"
    assert f"data/{name}/train.jsonl" in cfg.train_datasets[0]["path"]
    differ = {k for k in vars(cfg) if getattr(cfg, k) != getattr(ucf, k)}
    assert differ == {"num_action_classes", "output_dir", "train_datasets", "eval_datasets"}
    header = (REPO / "configs" / f"{name}.yaml").read_text()
    assert f"python {script} " in header and f"train.py --config configs/{name}.yaml" in header


@pytest.mark.parametrize("script, names", [
    ("prepare/kinetics.py", ["train.csv", "validate.csv", "val.csv", "test.csv", "missing.txt"]),
    ("prepare/hmdb51.py", ["<class>_test_split<K>.txt", "testTrainMulti_7030_splits", "hmdb51_org"]),
    ("prepare/mmaction.py", ["<frame_dir> <total_frames> <label>", "--train_list", "--frame_fps"]),
    ("prepare/folders.py", ["<root>/<class>/<clip>", "--val_fraction", "skipped.txt"]),
])
def test_help_names_the_official_files(script, names):
    # run as a user does, `python prepare/x.py` from the repo root: the import of prepare.records must work
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in names)
