"""What the README says is what runs: every command in a ```bash block of README.md and docs/*.md
runs here, in the order written, with only paths swapped for the tiny model and generated data in
the official layouts, and overrides that make it small (steps, batch, frames, pixels, workers; see
SMALL). A command someone edits runs as edited, so this test fails until it works.

What cannot run here, and what runs instead:
- `torchrun --nproc_per_node 8 train.py ARGS` runs `train.py ARGS` in this process, a world of one
  (2-rank torchrun runs: test_fsdp.py, test_resume.py, test_kill.py); the multi-node launch runs as
  two torchrun launchers on localhost (`--nproc_per_node 1` each, the endpoint swapped for localhost);
- `python3 -m venv`, `pip install` and the pytest command are the setup CI itself runs (.ci/run);
- `tensorboard --logdir runs` runs with `--inspect` (it reads the event files and exits);
- IVCP's YAML reports to wandb, which is optional: WANDB_MODE=disabled, the documented switch;
- NOT_HERE: vLLM (a GPU), and the snippet that needs a Qwen3.5 seq-cls export, each with what
  runs instead.
Scripts run in this process (their `main(argv)`, what `python script.py` calls), torchrun as a
process. The ```python block runs as written, the ```yaml block is merged into a config and
validated, the ```json record is read by data.load_samples.
"""

import importlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

import data
import llamafactory
from test_lf_config import IVCP_CONFIGS, write_ivcp_layout
from test_prepare import write_video
from test_resume import ROOT

DOCS = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
SCRIPTS = {"train.py": "train", "predict.py": "predict", "export.py": "export"}
# Appended to a script's arguments: the size of the run, never what it does.
SMALL = {
    "train": ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0", "--bf16", "false",
              "--video_maxlen", "4", "--video_max_pixels", "3136", "--video_min_pixels", "3136", "--eval_steps", "0",
              "--save_steps", "0"],
    "prepare.synthetic": ["--train", "24", "--val", "12", "--size", "64", "--frames", "8", "--fps", "8", "--workers", "1"],
}
SETUP = ("python3 -m venv", ".venv/bin/pip install", "pip install", ".venv/bin/python -m pytest")
# What cannot run on this machine, by a piece of its text, and what runs instead.
NOT_HERE = {"vllm serve": "vLLM needs a GPU: bench/vllm_check.py serves an export and compares the logits",
            "localhost:8000/classify": "a request to the vLLM server above",
            "synthetic-qwen3.5-seqcls": "needs a Qwen3.5 seq-cls export: tests/test_hub.py makes one and checks "
                                        "these logits against actcls's"}


def fenced_blocks(path):
    """[(language, text)] of every fenced block in a markdown file, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", open(os.path.join(ROOT, path)).read(), re.S | re.M)


def shell_commands(text):
    """A bash block -> its commands: continuation lines joined, `&&` chains split, comments dropped."""
    commands, pending = [], ""
    for line in text.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        pending = ""
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(tokens[:cut])
            tokens = tokens[cut + 1:]
    return commands


class Workspace:
    """A folder that plays the user's machine: configs/ with the repository's configs, their machine
    paths swapped for generated data here; `paths` maps each README path to its stand-in."""

    def __init__(self, root, tiny_model_dir):
        self.root = str(root)
        ucf_root, ucf_lists = self.fake_ucf101()
        ssv2_root, ssv2_labels = self.fake_sthsthv2()
        ivcp_data, ivcp_media = write_ivcp_layout(os.path.join(self.root, "ivcp"))
        clips = self.clips()
        class_folders = self.class_folders()
        self.paths = {
            "/data/UCF-101": ucf_root, "/data/ucfTrainTestlist": ucf_lists,
            "/data/20bn-something-something-v2": ssv2_root, "/data/labels": ssv2_labels,
            "/models/Qwen2.5-VL-3B-Instruct": tiny_model_dir, "/data/ivcp": ivcp_data, "/data/videos": ivcp_media,
            "qwen2_5vl_ucf101.yaml": os.path.join(IVCP_CONFIGS, "qwen2_5vl_ucf101.yaml"),
            "qwen2_5vl_ucf101_eval.yaml": os.path.join(IVCP_CONFIGS, "qwen2_5vl_ucf101_eval.yaml"),
            "some_clip.avi": clips[0], "a.mp4": clips[1], "b.avi": clips[0], "videos/": os.path.dirname(clips[0]),
            "node0.example.org:29500": f"localhost:{random.randint(20000, 40000)}", "my_clips": class_folders,
        }
        self.copy_configs({"Qwen/Qwen2.5-VL-3B-Instruct": "data/tiny-qwen2.5-vl", "Qwen/Qwen3-VL-4B-Instruct":
                           "data/tiny-qwen3-vl", "Qwen/Qwen3.5-4B": "data/tiny-qwen3.5", **self.paths})
        self.used = set()

    def fake_ucf101(self):
        """The official layout: the real classInd.txt (101 classes), a few clips of 3 classes."""
        root, lists = os.path.join(self.root, "UCF-101"), os.path.join(self.root, "ucfTrainTestlist")
        os.makedirs(lists)
        shutil.copy(os.path.join(ROOT, "tests", "data", "ucf101_classInd.txt"), os.path.join(lists, "classInd.txt"))
        classes = [line.split()[1] for line in open(os.path.join(lists, "classInd.txt")).read().splitlines()][:3]
        train, test = [], []
        for i, name in enumerate(classes):
            for group in (1, 8, 9):
                clip = f"{name}/v_{name}_g{group:02d}_c01.avi"
                write_video(os.path.join(root, clip), num_frames=6)
                (test.append(clip) if group == 1 else train.append(f"{clip} {i + 1}"))
        for name, lines in (("trainlist01.txt", train), ("testlist01.txt", test)):
            with open(os.path.join(lists, name), "w") as f:
                f.write("\r\n".join(lines) + "\r\n")
        return root, lists

    def fake_sthsthv2(self):
        """The official layout: labels.json with 174 templates, a few .webm clips."""
        root, labels = os.path.join(self.root, "ssv2"), os.path.join(self.root, "ssv2-labels")
        os.makedirs(labels)
        templates = [f"Moving something in way {i}" for i in range(174)]
        splits = {"train.json": range(6), "validation.json": range(6, 9)}
        with open(os.path.join(labels, "labels.json"), "w") as f:
            json.dump({t: str(i) for i, t in enumerate(templates)}, f)
        for name, ids in splits.items():
            items = [{"id": str(100 + i), "label": templates[i].lower(), "template": templates[i].replace("something", "[something]"),
                      "placeholders": ["a cup"]} for i in ids]
            with open(os.path.join(labels, name), "w") as f:
                json.dump(items, f)
            for item in items:
                write_video(os.path.join(root, f"{item['id']}.webm"), num_frames=6)
        with open(os.path.join(labels, "test.json"), "w") as f:
            json.dump([{"id": "200"}], f)
        write_video(os.path.join(root, "200.webm"), num_frames=6)
        return root, labels

    def clips(self):
        folder = os.path.join(self.root, "clips")
        paths = [os.path.join(folder, name) for name in ("one.avi", "two.mp4")]
        for path in paths:
            write_video(path, num_frames=6) if path.endswith(".avi") else shutil.copy(paths[0], path)
        return paths

    def class_folders(self):
        """A folder per class (docs/own-videos.md's my_clips): 6 classes x 10 clips."""
        root = os.path.join(self.root, "my_clips")
        for c in range(6):
            for i in range(10):
                write_video(os.path.join(root, f"class_{c}", f"clip_{i}.avi"), num_frames=6)
        return root

    def copy_configs(self, swaps):
        os.makedirs(os.path.join(self.root, "configs"))
        for name in os.listdir(os.path.join(ROOT, "configs")):
            text = open(os.path.join(ROOT, "configs", name)).read()
            for old, new in swaps.items():
                text = text.replace(old, new)
            with open(os.path.join(self.root, "configs", name), "w") as f:
                f.write(text)

    def swap(self, tokens):
        """Each README path in each argument, as a whole path (`my_clips`, not `data/my_clips/`)."""
        out = []
        for token in tokens:
            for old, new in self.paths.items():
                pattern = r"(?<![\w./-])" + re.escape(old) + r"(?![\w.-])"
                if re.search(pattern, token):
                    self.used.add(old)
                    token = re.sub(pattern, lambda _: new, token)
            out.append(token)
        return out


def run_script(tokens):
    """`python SCRIPT ARGS` in this process: the script's main(ARGS) plus SMALL's overrides."""
    script, args = tokens[1], tokens[2:]
    module = SCRIPTS.get(script) or script[:-3].replace("/", ".")
    main = importlib.import_module(module).main
    main(args + SMALL.get(module, []) + (["--num_workers", "0"] if module == "predict" else []))


def run_torchrun(tokens, ws):
    """One node's torchrun: train.py's arguments run in this process, a world of one (torchrun's own
    launches, 2 ranks: test_fsdp.py, test_resume.py, test_kill.py). The multi-node launch runs as
    written, as two torchrun launchers on localhost of one process each."""
    script = tokens.index("train.py")
    if "--nnodes" not in tokens:
        return run_script(["python", *tokens[script:]])
    args = tokens[1:] + SMALL["train"]
    args[args.index("--nproc_per_node") + 1] = "1"
    args[args.index("train.py")] = os.path.join(ROOT, "train.py")
    other = list(args)  # the second node: the same command with --node_rank 1
    other[other.index("--node_rank") + 1] = "1"
    launchers = [args, other]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *a], cwd=ws.root, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for a in launchers]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)


def run_command(tokens, ws):
    """One README command, or why it does not run here (the setup CI runs itself)."""
    text = shlex.join(tokens)
    if text.startswith(SETUP):
        return "setup"
    if any(piece in text for piece in NOT_HERE):
        return "not here"
    tokens = ws.swap(tokens)
    if tokens[0] in ("python", "python3", ".venv/bin/python"):
        run_script(tokens)
    elif tokens[0] == "torchrun":
        run_torchrun(tokens, ws)
    elif tokens[0] == "tensorboard":
        result = subprocess.run([sys.executable, "-m", "tensorboard.main", *tokens[1:], "--inspect"], cwd=ws.root,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "train/loss" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    else:  # grep | tail and the like
        pipeline = " | ".join(shlex.join(part) for part in split_pipes(tokens))
        result = subprocess.run(["bash", "-c", pipeline], cwd=ws.root, capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.strip(), f"{pipeline}: {result.stderr}"
    return "ran"


def split_pipes(tokens):
    parts, current = [], []
    for token in tokens:
        if token == "|":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts + [current]


def run_python_block(text, doc, ws):
    """A Python snippet, as written, in the workspace (its clip names swapped); it must not raise."""
    for old, new in ws.paths.items():
        if f'"{old}"' in text:
            ws.used.add(old)
            text = text.replace(f'"{old}"', repr(new))
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # `from inference import ...`: the snippets run beside the repository's modules
    exec(compile(text, f"{doc} python block", "exec"), {})


def check_yaml_block(text, ws):
    """A config fragment: merged into configs/ucf101.yaml, it must validate."""
    raw = {**yaml.safe_load(open(os.path.join(ws.root, "configs", "ucf101.yaml"))), **yaml.safe_load(text)}
    path = os.path.join(ws.root, "fragment.yaml")
    yaml.safe_dump(raw, open(path, "w"))
    cfg = llamafactory.parse_config(["--config", path])
    assert cfg.label_spaces


def check_json_block(text, ws):
    """A record, its video generated under a video_root: data.load_samples reads it as one sample."""
    record = json.loads(text)
    root = os.path.join(ws.root, "record-videos")
    write_video(os.path.join(root, record["videos"][0]), num_frames=6)
    path = os.path.join(ws.root, "record.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(record) + "\n")
    samples, bad = data.load_samples(path, root, 101)
    assert [(s.label, bad) for s in samples] == [(record["action_label"], [])]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    return Workspace(tmp_path_factory.mktemp("user"), tiny_model_dir)


def test_every_readme_and_docs_command_runs_as_written(workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # IVCP's YAML reports to wandb, optional and not installed here
    ran, done = [], set()
    for doc in DOCS:
        for language, text in fenced_blocks(doc):
            if language == "bash":
                for tokens in shell_commands(text):
                    if shlex.join(tokens) not in done:
                        done.add(shlex.join(tokens))
                        start = time.perf_counter()
                        how = run_command(tokens, workspace)
                        ran.append((doc, shlex.join(tokens), f"{how} in {time.perf_counter() - start:.1f}s"))
            elif language == "python" and not any(piece in text for piece in NOT_HERE):
                run_python_block(text, doc, workspace)
            elif language == "yaml":
                check_yaml_block(text, workspace)
            elif language == "json":
                check_json_block(text, workspace)
    print("\n".join(f"{doc}: {how}: {command}" for doc, command, how in ran))
    assert workspace.used == set(workspace.paths), f"stand-ins no command uses: {set(workspace.paths) - workspace.used}"
    assert sum(how.startswith("ran") for _, _, how in ran) >= 15
