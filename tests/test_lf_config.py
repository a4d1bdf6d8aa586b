"""A LLaMA-Factory / IVCP user's YAML: every key of IVCP's four published configs is a Config key,
translated, ignored with its reason, or refused with what to do; datasets by name through
dataset_info.json; IVCP's own head and adapter folders recognised."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

import config
import llamafactory
import data
import model
import train
from prepare.synthetic import make_clip, write_video

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
IVCP_CONFIGS = os.path.join(DATA, "ivcp")  # IVCP's four configs and its registry, in its format
YAMLS = sorted(name for name in os.listdir(IVCP_CONFIGS) if name.endswith(".yaml"))


def ivcp_yaml(name):
    return config.read_yaml(os.path.join(IVCP_CONFIGS, name))


def write_ivcp_layout(root, train=16, test=4):
    """IVCP's on-disk layout, small: root/data holds IVCP's dataset_info.json and records of IVCP's UCF101
    files (the excerpt: train from its first records, test from its last; SSv2: records in the same
    format), root/media generated clips at the records' relative paths. Returns (dataset_dir, media_dir)."""
    dataset_dir, media_dir = os.path.join(root, "data"), os.path.join(root, "media")
    os.makedirs(dataset_dir)
    shutil.copy(os.path.join(IVCP_CONFIGS, "dataset_info.json"), dataset_dir)
    rng = np.random.default_rng(0)
    with open(os.path.join(DATA, "ivcp_ucf101_excerpt.json")) as f:
        excerpt = json.load(f)
    for split, records in (("train", excerpt[:train]), ("test", excerpt[-test:])):
        write_split(os.path.join(dataset_dir, f"ucf101_{split}.json"), records, media_dir, rng)
    for split, count in (("train", train), ("val", test)):
        records = [{"messages": [{"role": "user", "content": "<video>What action is being performed?"},
                                 {"role": "assistant", "content": "The action being performed is <ACT>."}],
                    "videos": [f"sthsthv2/{split}_{i}.webm"], "action_label": 7 * i + 3} for i in range(count)]
        write_split(os.path.join(dataset_dir, f"sthsthv2_{split}.json"), records, media_dir, rng)
    return dataset_dir, media_dir


def write_split(path, records, media_dir, rng):
    for record in records:
        video = os.path.join(media_dir, record["videos"][0])
        os.makedirs(os.path.dirname(video), exist_ok=True)
        write_video(video, make_clip(record["action_label"] % 6, rng, size=64, frames=8), fps=8)
    with open(path, "w") as f:
        json.dump(records, f, indent=2)


@pytest.fixture(scope="module")
def ivcp_layout(tmp_path_factory):
    return write_ivcp_layout(str(tmp_path_factory.mktemp("ivcp")))


def parse(argv):
    notes = []
    return llamafactory.parse_config(argv, notes=notes), notes


# ---------------------------------------------------------------------------------------------------
# Every key of IVCP's YAMLs

@pytest.mark.parametrize("name,key", [(name, key) for name in YAMLS for key in ivcp_yaml(name)])
def test_every_ivcp_key_is_handled(name, key):
    kind = llamafactory.lf_key_kind(key)
    assert kind in ("field", "translated", "ignored", "refused"), f"{name}: {key} is neither accepted nor refused"


@pytest.mark.parametrize("name", YAMLS)
def test_ivcp_yaml_parses_with_paths_changed(name, ivcp_layout, tmp_path):
    dataset_dir, media_dir = ivcp_layout
    argv = ["--config", os.path.join(IVCP_CONFIGS, name), "--model_name_or_path", "data/tiny-qwen2.5-vl", "--dataset_dir", dataset_dir,
            "--media_dir", media_dir, "--output_dir", str(tmp_path / "out")]
    raw = ivcp_yaml(name)
    if raw.get("adapter_name_or_path"):  # evaluation / prediction of a checkpoint: an actcls one here
        argv += ["--adapter_name_or_path", fake_checkpoint(tmp_path / "ckpt", use_dora=True)]
    cfg, notes = parse(argv)
    # every ignored key is listed exactly once, with a reason
    for key in set(raw) & set(llamafactory.IGNORED):
        lines = [n for n in notes if n.startswith(f"ignored (no effect here): {key}: ")]
        assert len(lines) == 1 and llamafactory.IGNORED[key] in lines[0]
    assert any("flash_attn: fa2 -> attn_implementation" in n for n in notes)
    assert any(n.startswith("ignored (no effect here): stage: action_cls") for n in notes)
    assert any(n.startswith("ignored (no effect here): cutoff_len: 2048: no sample reaches it") for n in notes)
    assert cfg.video_max_pixels == 16384 and cfg.num_action_classes == raw["num_action_classes"]
    split = "test" if "ucf101" in name else "val"
    assert cfg.eval_datasets == [{"path": os.path.join(dataset_dir, f"{raw['eval_dataset']}.json"),
                                  "video_root": media_dir, "name": raw["eval_dataset"]}]
    assert raw["eval_dataset"].endswith(split)
    if raw.get("do_train"):
        assert not cfg.eval_only and cfg.train_datasets[0]["name"] == raw["dataset"]
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.use_dora, cfg.learning_rate) == (16, 32, True, 5e-5)
    else:
        assert cfg.eval_only and cfg.checkpoint == str(tmp_path / "ckpt") and cfg.use_dora is True
        assert any("use_dora: false -> true" in n for n in notes)  # the checkpoint's settings, not the YAML's


def fake_checkpoint(path, **settings):
    """A folder that passes for an actcls checkpoint at parse time: its files, its config.yaml."""
    os.makedirs(path)
    (path / "trainable.safetensors").write_bytes(b"")
    (path / "trainer_state.json").write_text("{}")
    (path / "config.yaml").write_text(yaml.safe_dump({"action_decoder_type": "linear", **settings}))
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Single keys: aliases, refusals, did-you-mean

@pytest.mark.parametrize("available,expected", [(False, "sdpa"), (True, "flash_attention_2")])
def test_fa2_falls_back_to_sdpa_without_flash_attn(monkeypatch, available, expected):
    monkeypatch.setattr(llamafactory, "flash_attn_available", lambda: available)
    cfg, notes = parse(["--train_datasets", "[{path: x.jsonl}]", "--flash_attn", "fa2"])
    assert cfg.attn_implementation == expected
    warned = [n for n in notes if n.startswith("warning: flash_attn: fa2 -> attn_implementation: sdpa")]
    assert len(warned) == (0 if available else 1)


@pytest.mark.parametrize("argv,expected", [
    (["--flash_attn", "disabled"], {"attn_implementation": "eager"}),
    (["--resume_from_checkpoint", "true"], {"resume": "auto"}),
    (["--resume_from_checkpoint", "runs/x/checkpoints/step_0000100"], {"resume": "runs/x/checkpoints/step_0000100"}),
    (["--disable_gradient_checkpointing", "false"], {"gradient_checkpointing": True}),
    (["--fp16", "false", "--optim", "adamw_torch", "--adam_epsilon", "1e-8"], {"bf16": False}),
])
def test_aliases(argv, expected):
    cfg, _ = parse(["--train_datasets", "[{path: x.jsonl}]"] + argv)
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_every_given_task_flag_is_listed():
    _, notes = parse(["--train_datasets", "[{path: x.jsonl}]", "--do_train", "true", "--do_eval", "true",
                      "--do_predict", "false"])
    for key in ("do_train", "do_eval", "do_predict"):
        assert sum(n.startswith(f"ignored (no effect here): {key}: ") for n in notes) == 1


@pytest.mark.parametrize("argv,fragment", [
    (["--fp16", "true"], "fp16: true is not supported: fp16 (loss scaling) is not built; use bf16: true"),
    (["--deepspeed", "ds_z3.json"], "deepspeed: ds_z3.json is not supported: DeepSpeed is not used"),
    (["--stage", "sft"], "stage: 'sft': actcls trains only IVCP's action_cls stage"),
    (["--flash_attn", "fa3"], "flash_attn: 'fa3' is not one of"),
    (["--eval_strategy", "epoch"], "set eval_steps to the steps per epoch"),
    (["--cutoff_len", "512"], "cutoff_len: 512, but a sample can reach ~"),
    (["--do_train", "true", "--adapter_name_or_path", "x"], "continue an actcls run with resume_from_checkpoint"),
    (["--do_train", "false"], "nothing to do"),
    (["--do_train", "false", "--do_eval", "true"], "do_eval: true needs adapter_name_or_path"),
    (["--flash_attn", "fa2", "--attn_implementation", "sdpa"], "flash_attn and attn_implementation both set"),
    (["--frobnicate", "1"], "unknown key 'frobnicate'\n"),
    (["--flash_atn", "fa2"], "unknown key 'flash_atn'; did you mean 'flash_attn'?"),
])
def test_refused_with_what_to_do(argv, fragment):
    with pytest.raises(config.ConfigError) as err:
        llamafactory.parse_config(["--train_datasets", "[{path: x.jsonl}]"] + argv + ["--seed", "1"])
    assert fragment in str(err.value) + "\n"


def test_no_far_fetched_did_you_mean():
    """The seed's misleading hints: stage -> lora_target, do_train -> video_maxlen, flash_attn -> lora_rank."""
    for key in ("stage", "do_train", "flash_attn"):
        assert llamafactory.lf_key_kind(key) == "translated"
    with pytest.raises(config.ConfigError) as err:
        llamafactory.parse_config(["--train_datasets", "[{path: x.jsonl}]", "--stages", "x", "--do_trainn", "x"])
    assert "did you mean 'stage'?" in str(err.value) and "did you mean 'do_train'?" in str(err.value)
    assert "lora_target" not in str(err.value) and "video_maxlen" not in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Datasets by name

def write_registry(root, entries, records):
    """dataset_info.json with `entries`, and {file_name: records} beside it."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset_info.json"), "w") as f:
        json.dump(entries, f)
    for file_name, rows in records.items():
        with open(os.path.join(root, file_name), "w") as f:
            json.dump(rows, f)
    return str(root)


def test_registry_columns_and_tags_are_honoured(tmp_path):
    """LLaMA-Factory's sharegpt defaults (conversations, from/value, human/gpt) when an entry names
    none, and an entry's own renamed columns and tags."""
    clip = tmp_path / "media" / "a.mp4"
    os.makedirs(clip.parent)
    clip.write_bytes(b"x")
    lf_default = {"conversations": [{"from": "human", "value": "<video>What?"},
                                    {"from": "gpt", "value": "It is <ACT>."}], "videos": ["a.mp4"], "action_label": 1}
    renamed = {"dialog": [{"speaker": "person", "text": "<video>What?"}, {"speaker": "bot", "text": "It is <ACT>."}],
               "clips": ["a.mp4"], "action_label": 2}
    root = write_registry(tmp_path / "reg", {
        "plain": {"file_name": "plain.json", "formatting": "sharegpt"},
        "mine": {"file_name": "mine.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "videos": "clips"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot"}},
    }, {"plain.json": [lf_default], "mine.json": [renamed]})
    cfg, notes = parse(["--dataset", "plain, mine", "--dataset_dir", root, "--media_dir", str(tmp_path / "media")])
    assert [e["name"] for e in cfg.train_datasets] == ["plain", "mine"]  # a comma list
    assert cfg.train_datasets[1]["columns"] == {"messages": "dialog", "videos": "clips"}
    for entry, label in zip(cfg.train_datasets, (1, 2)):
        rename = lambda record, e=entry: llamafactory.renamed_record(record, e.get("columns"), e.get("tags"))  # noqa: E731
        samples, bad = data.load_samples(entry["path"], entry["video_root"], 6, rules=data.EntryRules(rename))
        assert bad == [] and samples[0].label == label and samples[0].video == str(clip)
        assert samples[0].messages == [{"role": "user", "content": "<video>What?"},
                                       {"role": "assistant", "content": "It is <ACT>."}]
    assert any(n.startswith("LLaMA-Factory/IVCP key translated: dataset: plain,mine -> train_datasets") for n in notes)


def test_media_dir_defaults_to_dataset_dir_and_falls_back_to_the_path_as_written(tmp_path, monkeypatch):
    record = {"messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "<ACT>"}],
              "action_label": 0}
    root = write_registry(tmp_path / "reg", {"d": {"file_name": "d.json", "formatting": "sharegpt",
                                                   "columns": {"messages": "messages"},
                                                   "tags": dict(llamafactory.NATIVE_TAGS)}},
                          {"d.json": [{**record, "videos": ["inside.mp4"]}, {**record, "videos": ["clips/cwd.mp4"]}]})
    (tmp_path / "reg" / "inside.mp4").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    os.makedirs("clips")
    (tmp_path / "clips" / "cwd.mp4").write_bytes(b"x")
    cfg, _ = parse(["--dataset", "d", "--dataset_dir", root])
    entry = cfg.train_datasets[0]
    assert entry["video_root"] == root and "columns" not in entry and "tags" not in entry
    samples, bad = data.load_samples(entry["path"], entry["video_root"], 6)
    assert bad == [] and [s.video for s in samples] == [os.path.join(root, "inside.mp4"),
                                                         str(tmp_path / "clips" / "cwd.mp4")]


def test_registry_problems_name_what_to_do(tmp_path):
    root = write_registry(tmp_path / "reg", {"a": {"file_name": "a.json", "formatting": "sharegpt"},
                                             "b": {"file_name": "b.json"},
                                             "c": {"hf_hub_url": "x/y", "formatting": "sharegpt"}}, {"a.json": []})
    cases = [("zzz", "'zzz' is not in " + os.path.join(root, "dataset_info.json") + "; it lists: a, b, c"),
             ("b", "formatting 'alpaca'; only sharegpt"), ("c", "only local files (file_name)")]
    for name, fragment in cases:
        with pytest.raises(config.ConfigError) as err:
            llamafactory.parse_config(["--dataset", name, "--dataset_dir", root])
        assert fragment in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        llamafactory.parse_config(["--dataset", "a", "--dataset_dir", str(tmp_path)])
    assert "cannot read the dataset registry" in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        llamafactory.parse_config(["--dataset", "a", "--dataset_dir", root, "--train_datasets", "[{path: x.jsonl}]"])
    assert "dataset and train_datasets both set: keep one" in str(err.value)
    cfg, notes = parse(["--dataset_dir", root, "--train_datasets", "[{path: x.jsonl}]"])  # no name to look up
    assert cfg.train_datasets == [{"path": "x.jsonl"}]
    assert notes == [f"ignored (no effect here): dataset_dir: {root}: read only for dataset / eval_dataset"]


# ---------------------------------------------------------------------------------------------------
# IVCP's own files

def ivcp_head(directory, decoder_type, hidden=64, classes=5):
    """What IVCP's ActionDecoder.save_pretrained writes: action_decoder.safetensors, keys head.*, no json."""
    os.makedirs(directory)
    if decoder_type == "linear":
        state = {"head." + k: v for k, v in nn.Linear(hidden, classes).state_dict().items()}
    elif decoder_type == "mlp":
        layers = nn.Sequential(nn.Linear(hidden, 32), nn.GELU(), nn.Linear(32, classes))
        state = {"head." + k: v for k, v in layers.state_dict().items()}
    else:
        state = {"projection.weight": torch.zeros(hidden, hidden), "final_norm.weight": torch.ones(hidden),
                 "head.0.weight": torch.zeros(32, hidden)}
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "action_decoder.safetensors"))
    return str(directory), state


@pytest.mark.parametrize("decoder_type", ["linear", "mlp"])
def test_ivcp_linear_and_mlp_heads_load(tmp_path, decoder_type):
    path, state = ivcp_head(tmp_path / "head", decoder_type)
    _, notes = parse(["--train_datasets", "[{path: x.jsonl}]", "--action_decoder_path", path])
    assert any(f"IVCP's {decoder_type} head (head.* keys, no action_decoder.json) loads" in n for n in notes)
    head = model.pretrained_head(path)
    x = torch.randn(3, 64)
    if decoder_type == "linear":
        expected = x @ state["head.weight"].T + state["head.bias"]
    else:
        inner = torch.nn.functional.gelu(x @ state["head.0.weight"].T + state["head.0.bias"])
        expected = inner @ state["head.2.weight"].T + state["head.2.bias"]
    torch.testing.assert_close(head(x), expected)
    assert head.config["num_classes"] == 5 and head.config["hidden_size"] == 64


def test_ivcp_transformer_head_is_refused_with_why(tmp_path):
    path, _ = ivcp_head(tmp_path / "head", "transformer")
    with pytest.raises(config.ConfigError) as err:
        llamafactory.parse_config(["--train_datasets", "[{path: x.jsonl}]", "--action_decoder_path", path])
    assert "IVCP's transformer head" in str(err.value) and "action_decoder_path: null" in str(err.value)
    with pytest.raises(config.ConfigError, match="IVCP's transformer head"):
        model.pretrained_head(path)


def test_ivcp_adapter_is_recognised_with_why(tmp_path):
    adapter = tmp_path / "checkpoint-2500"
    os.makedirs(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    save_file({"base_model.model.model.language_model.embed_tokens.weight": torch.zeros(151680, 2),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(16, 2)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(config.ConfigError) as err:
        llamafactory.parse_config(["--do_eval", "true", "--do_train", "false", "--adapter_name_or_path", str(adapter),
                             "--eval_datasets", "[{path: x.jsonl}]"])
    message = str(err.value)
    assert f"adapter_name_or_path {adapter}: a peft adapter" in message
    assert "its embed_tokens has 151680 rows" in message and "point adapter_name_or_path at OUTPUT_DIR" in message
    os.makedirs(tmp_path / "run" / "checkpoints")
    with pytest.raises(config.ConfigError, match="a run folder; point it at one of its checkpoints"):
        llamafactory.parse_config(["--do_predict", "true", "--adapter_name_or_path", str(tmp_path / "run"),
                             "--eval_datasets", "[{path: x.jsonl}]"])


# ---------------------------------------------------------------------------------------------------
# End to end: IVCP's training YAML, then its eval YAML on the checkpoint it wrote

def test_train_then_eval_with_ivcp_yamls(ivcp_layout, tiny_model_dir, tmp_path, capsys):
    """Paths changed, plus overrides that only make it fast (one small step, no workers, fp32 on CPU).
    The start-up lines come once; the eval YAML evaluates the checkpoint to the training's own val loss."""
    dataset_dir, media_dir = ivcp_layout
    paths = ["--model_name_or_path", tiny_model_dir, "--dataset_dir", dataset_dir, "--media_dir", media_dir]
    fast = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--dataloader_num_workers", "0", "--bf16", "false"]
    fast += ["--report_to", "none"]  # the YAML's wandb is optional and not installed for the tests
    train_yaml = os.path.join(IVCP_CONFIGS, "qwen2_5vl_ucf101.yaml")
    train.main(["--config", train_yaml, *paths, "--output_dir", str(tmp_path / "run"), *fast])
    out = capsys.readouterr().out
    assert out.count("ignored (no effect here): plot_loss: true: ") == 1
    assert out.count("LLaMA-Factory/IVCP key translated: dataset: ucf101_train -> train_datasets") == 1
    val = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"val"' in line][-1]

    # The eval YAML's model_name_or_path is its author's machine: no path for it here, the checkpoint's is taken.
    eval_yaml = os.path.join(IVCP_CONFIGS, "qwen2_5vl_ucf101_eval.yaml")
    best = str(tmp_path / "run" / "checkpoints" / "best")
    train.main(["--config", eval_yaml, *paths[2:], "--adapter_name_or_path", best,
                "--output_dir", str(tmp_path / "eval"), "--dataloader_num_workers", "0", "--bf16", "false"])
    out = capsys.readouterr().out
    assert "the checkpoint's model settings: lora_dropout: 0.0 -> 0.05, use_dora: false -> true" in out
    assert (f"model_name_or_path: {yaml.safe_load(open(eval_yaml))['model_name_or_path']} does not exist here; "
            f"{tiny_model_dir}: the base model {best} was trained on") in out
    result = json.load(open(tmp_path / "eval" / "eval.json"))["datasets"]["ucf101_test"]
    assert result["count"] == 4 and result["loss"] == pytest.approx(val["loss"], abs=1e-4)

    # A checkpoint whose base model is not on this machine either: one line saying what to pass.
    moved = str(tmp_path / "moved")
    shutil.copytree(best, moved)
    saved = yaml.safe_load(open(os.path.join(moved, "config.yaml")))
    yaml.safe_dump({**saved, "model_name_or_path": "/elsewhere/Qwen2.5-VL-3B-Instruct"}, open(os.path.join(moved, "config.yaml"), "w"))
    with pytest.raises(config.ConfigError) as error:
        llamafactory.parse_config(["--config", eval_yaml, *paths[2:], "--adapter_name_or_path", moved])
    assert (f"model_name_or_path: /path/to/Qwen2.5-VL-3B-Instruct does not exist here, nor does the base model {moved} "
            f"was trained on, /elsewhere/Qwen2.5-VL-3B-Instruct: pass --model_name_or_path with the folder that holds "
            f"Qwen2.5-VL-3B-Instruct on this machine") in str(error.value)


def test_ivcp_head_must_fit_the_model(tiny_model_dir, tmp_path):
    """build_classifier takes an IVCP head as the initial head only when it reads this model's hidden size."""
    base = ["--train_datasets", "[{path: x.jsonl}]", "--model_name_or_path", tiny_model_dir,
            "--num_action_classes", "5"]
    fits, state = ivcp_head(tmp_path / "fits", "linear", hidden=64)
    cfg = llamafactory.parse_config(base + ["--action_decoder_path", fits])
    _, classifier = model.build_classifier(cfg, config.head_sizes(cfg))
    torch.testing.assert_close(classifier.heads["default"].net.weight, state["head.weight"])
    other, _ = ivcp_head(tmp_path / "other", "linear", hidden=32)
    cfg = llamafactory.parse_config(base + ["--action_decoder_path", other])
    with pytest.raises(config.ConfigError, match="reads a hidden state of size 32, .* gives 64"):
        model.build_classifier(cfg, config.head_sizes(cfg))
