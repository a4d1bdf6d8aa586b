"""A checkpoint's adapters merged into its base model's weights, streamed: the base's safetensors
files are read one tensor at a time, each trained weight is merged (in fp32) and cast, and the result
goes straight into the export's shards. The process holds about one tensor (the largest is the
embedding table: 0.6 GB in bf16 for Qwen2.5-VL-3B) besides python and torch, never the model.

    write_merged_backbone(checkpoint, out_dir, dtype, max_shard_size) -> (vlm on the meta device, tied)

It computes what peft's merge_and_unload does (model.merged_backbone, the in-memory reference;
tests/test_merge.py compares the two tensor by tensor):
- LoRA: W + s * B @ A, with s = lora_alpha / r (use_rslora: lora_alpha / sqrt(r));
- DoRA: m / ||W + s * B @ A|| * (W + s * B @ A), the norm taken over each output row;
- modules_to_save copies (additional_target) and fully trained layers replace the base's tensor;
- the trained <ACT> row is written into the input embedding table (and into lm_head's, when tied).
The tensors keep the base files' names and order, so the export loads through the same
from_pretrained renaming as the base (Qwen2.5-VL's hub files still use the pre-transformers-5 names).
Files are read with plain reads, not mmap: mapped pages would count in this process's RSS.
"""

import json
import math
import os
import re
import struct

import torch

from checkpoint import CONFIG_FILE, TRAINABLE_FILE, CheckpointError
from config import saved_config
from model import load_processor, load_vlm

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# A checkpoint's key for an adapter tensor (peft's default adapter) and for a modules_to_save copy,
# after the classifier's "vlm." and peft's "base_model.model." prefixes.
ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)\.default\.weight$")
SAVED_COPY_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save\.default\.(?P<rest>.+)$")


class SafetensorsFile:
    """One .safetensors file: its header, and its tensors read on demand (each into its own buffer)."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (struct.error, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        unknown = sorted({e["dtype"] for e in header.values()} - set(SAFETENSORS_DTYPES))
        if unknown:
            raise CheckpointError(f"{path}: tensors of dtype {', '.join(unknown)}, which the streamed merge does "
                                  f"not read (it reads {', '.join(SAFETENSORS_DTYPES)})")
        self.data_start, self.entries = 8 + length, header

    def names(self):
        """In file order, so reading them in turn reads the file front to back."""
        return sorted(self.entries, key=lambda name: self.entries[name]["data_offsets"][0])

    def dtype(self, name):
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def shape(self, name):
        return list(self.entries[name]["shape"])

    def read(self, name):
        begin, end = self.entries[name]["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path}: {name} is cut short (the file is truncated)")
        if not buffer:
            return torch.empty(self.shape(name), dtype=self.dtype(name))
        return torch.frombuffer(buffer, dtype=self.dtype(name)).reshape(self.shape(name))


def write_safetensors(path, layout, produce):
    """layout: [(name, dtype, shape)] in file order; produce(name) makes each tensor when its turn
    comes, so only one is held at a time (the header, written first, needs only shapes and dtypes)."""
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in layout:
            tensor = produce(name)
            assert tensor.dtype == dtype and list(tensor.shape) == shape, (name, tensor.dtype, tensor.shape)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy


class Trained:
    """What a checkpoint changes in its base, by the plain model's parameter names: `lora` maps a
    weight to its adapter's checkpoint keys, `replaced` a tensor to the checkpoint key that replaces it."""

    def __init__(self, checkpoint, cfg):
        self.file = SafetensorsFile(os.path.join(checkpoint, TRAINABLE_FILE))
        self.cfg, self.lora, self.replaced = cfg, {}, {}
        for key in self.file.entries:
            name = key.removeprefix("vlm.").removeprefix("base_model.model.")
            if key == "act_embedding":
                continue
            if match := ADAPTER_KEY.match(name):
                self.lora.setdefault(match["module"] + ".weight", {})[match["part"]] = key
            elif match := SAVED_COPY_KEY.match(name):
                self.replaced[f"{match['module']}.{match['rest']}"] = key
            else:  # full / freeze fine-tuning: the trained layer itself
                self.replaced[name] = key
        self.act_row = self.file.read("act_embedding") if "act_embedding" in self.file.entries else None

    def names(self):
        return set(self.lora) | set(self.replaced)

    def apply(self, name, base):
        """The merged (or replaced) tensor for parameter `name`, in fp32; `base` when nothing trained it."""
        if name in self.replaced:
            new = self.file.read(self.replaced[name])
            if list(new.shape) != list(base.shape):
                raise CheckpointError(f"{self.file.path}: {name} has shape {list(new.shape)}, the base model's "
                                      f"{list(base.shape)}: it was trained on another base model")
            return new.float()
        if name in self.lora:
            return self.merged(base.float(), self.lora[name])
        return base

    def merged(self, weight, adapter):
        """peft's merge (lora.Linear.get_delta_weight, DoraLinearVariant.merge_safe) for one Linear weight."""
        lora_a, lora_b = self.file.read(adapter["lora_A"]).float(), self.file.read(adapter["lora_B"]).float()
        rank = lora_a.shape[0]
        scaling = self.cfg.lora_alpha / (math.sqrt(rank) if self.cfg.use_rslora else rank)
        merged = weight + (lora_b @ lora_a) * scaling
        if "lora_magnitude_vector" not in adapter:
            return merged
        magnitude = self.file.read(adapter["lora_magnitude_vector"]).float()
        return (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged


def base_weight_files(path):
    """The base model's safetensors files: a folder's own, or those of a hub name (downloaded into the
    Hugging Face cache as from_pretrained would)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    index = cached_file(path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [cached_file(path, shard) for shard in shards]
    single = cached_file(path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    if single is None:
        raise CheckpointError(f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; export.py merges "
                              f"from safetensors weights")
    return [single]


def parameter_names(vlm, files):
    """{file key: (the model's parameter name, whether a many-to-one converter takes it)}, through
    transformers' own load-time renaming (the same rules from_pretrained applies to these files)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(vlm)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = vlm.state_dict()
    names = {}
    for file in files:
        for key in file.entries:
            name, converted = rename_source_key(key, renamings, converters, vlm.base_model_prefix, state)
            names[key] = (name, converted is not None)
    return names


def check_covered(trained, names, base):
    """Every trained tensor must land on a base tensor that is copied one to one: nothing is dropped."""
    plain = {name for name, converted in names.values() if not converted}
    missing = sorted(trained.names() - plain)
    if missing:
        raise CheckpointError(f"{trained.file.path}: {len(missing)} trained tensor(s) have no counterpart in the "
                              f"weights of {base} (e.g. {', '.join(missing[:3])}); was it trained on another "
                              f"base model?")


def shards(layout, max_bytes):
    """The layout cut into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    out, size = [[]], 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if out[-1] and size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(entry)
        size += nbytes
    return out


def write_merged_backbone(checkpoint, directory, dtype, max_shard_size):
    """Writes config.json, generation_config.json and the merged weights (model.safetensors, or shards
    + index) of `checkpoint` into `directory`, in `dtype` (integer tensors keep theirs). Returns the
    architecture on the meta device (for its config and class) and whether lm_head shares the table."""
    from transformers.utils.hub import convert_file_size_to_int

    cfg = saved_config(os.path.join(checkpoint, CONFIG_FILE))
    _, act_token_id = load_processor(cfg.model_name_or_path, cfg.trust_remote_code)
    vlm = load_vlm(cfg, act_token_id, weights=False)
    files = [SafetensorsFile(path) for path in base_weight_files(cfg.model_name_or_path)]
    trained = Trained(checkpoint, cfg)
    names = parameter_names(vlm, files)
    check_covered(trained, names, cfg.model_name_or_path)
    table = vlm.get_input_embeddings().weight
    table_names = {n for n, p in vlm.named_parameters(remove_duplicate=False) if p is table}  # + lm_head when tied
    source = {key: file for file in files for key in file.entries}

    def produce(key):
        name = names[key][0]
        tensor = trained.apply(name, source[key].read(key))
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if name in table_names and trained.act_row is not None:
            tensor[act_token_id] = trained.act_row.to(dtype)
        return tensor

    layout = [(key, dtype if file.dtype(key).is_floating_point else file.dtype(key), file.shape(key))
              for file in files for key in file.names()]
    write_shards(directory, shards(layout, convert_file_size_to_int(max_shard_size)), produce)
    write_configs(vlm, cfg, directory, dtype)
    output = vlm.get_output_embeddings()
    return vlm, output is not None and output.weight is table


def write_shards(directory, parts, produce):
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if len(parts) == 1:
        write_safetensors(os.path.join(directory, SAFE_WEIGHTS_NAME), parts[0], produce)
        return
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), part, produce)
        weight_map.update({key: name for key, _, _ in part})
        total += sum(math.prod(shape) * dt.itemsize for _, dt, shape in part)
    with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_configs(vlm, cfg, directory, dtype):
    """config.json as save_pretrained writes it (this class, this dtype) and the base's generation config."""
    from transformers import GenerationConfig

    vlm.config.architectures = [type(vlm).__name__]
    vlm.config.dtype = dtype
    vlm.config.save_pretrained(directory)
    if vlm.can_generate():
        try:
            generation = GenerationConfig.from_pretrained(cfg.model_name_or_path)
        except OSError:  # the base has none: the one from_config derived
            generation = vlm.generation_config
        generation.save_pretrained(directory)
