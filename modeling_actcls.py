"""An actcls export as a transformers model and pipeline: no actcls on the path, transformers alone.

    from transformers import AutoModel, pipeline
    clf = AutoModel.from_pretrained("exports/ucf101", trust_remote_code=True)
    clf.predict(["a.mp4"], top_k=5)   # [{"video": "/abs/a.mp4", "top": [("Basketball", 0.91), ...]}], as
                                      # inference.VideoClassifier.predict returns
    pipe = pipeline("video-classification", model="exports/ucf101", trust_remote_code=True)
    pipe("a.mp4")                     # [{"score": 0.91, "label": "Basketball"}, ...]

export.py copies this file into every export with the project modules it imports (chat.py, video.py,
decoder.py: none of them imports anything else of the project) and points config.json at it the way
the Hub does: `auto_map` for AutoModel, `custom_pipelines` for the pipeline. Inside an export
transformers loads these files as one package, hence the relative imports; in the repository they
are flat modules. Videos are sampled as evaluation samples them (actcls.json: the video settings,
the views, the prompt), so the probabilities are VideoClassifier's (tests/test_export.py).
"""

import errno
import json
import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Pipeline, PreTrainedModel

try:  # in an export: a package, beside its copies of these modules
    from .chat import ACT_TOKEN, processor_inputs, prompt_text
    from .decoder import ActionDecoder
    from .video import DataError, VideoSettings, load_sampled
except ImportError:  # in the repository: flat root modules
    from chat import ACT_TOKEN, processor_inputs, prompt_text
    from decoder import ActionDecoder
    from video import DataError, VideoSettings, load_sampled

EXPORT_FILE = "actcls.json"  # checkpoint.EXPORT_FILE
EXPORT_FORMAT = 1  # checkpoint.EXPORT_FORMAT (a test keeps them equal: this file cannot import checkpoint)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")  # inference.VIDEO_EXTENSIONS
CODE_FILES = ("modeling_actcls.py", "chat.py", "video.py", "decoder.py")  # what export.py copies in
AUTO_MAP = {"AutoModel": "modeling_actcls.ActclsVideoClassifier"}
# What PIPELINE_REGISTRY.register_pipeline + Pipeline.save_pretrained write into config.json
CUSTOM_PIPELINES = {"video-classification": {"impl": "modeling_actcls.ActclsVideoClassificationPipeline",
                                             "pt": ["AutoModel"], "tf": [], "type": "video"}}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ExportError(ValueError):
    """A folder this code cannot run; the message says which export form or tool works instead."""


def read_manifest(directory):
    """actcls.json of an export this code runs: the default form, this format."""
    path = os.path.join(directory, EXPORT_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{directory}: no {EXPORT_FILE}, so not an actcls export; make one with actcls's "
                          f"`python export.py --checkpoint CHECKPOINT --out DIR`")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    form = manifest.get("form", "actcls")
    if form != "actcls":
        raise ExportError(f"{directory} is a {form} export: transformers' AutoModelForSequenceClassification "
                          f"and vLLM's pooling runner read it, not this code; for predict() and the pipeline "
                          f"export the checkpoint without --as (`python export.py --checkpoint CHECKPOINT --out DIR`)")
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: export format {manifest.get('format')!r}, this code reads {EXPORT_FORMAT}; "
                          f"export the checkpoint again with the actcls that wrote this file")
    return manifest


def local_folder(name_or_path, revision=None, token=None):
    """A local export as it is; a Hub repository's files, downloaded (weights, heads, actcls.json)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision, token=token)


class ActclsVideoClassifier(PreTrainedModel):
    """The exported VLM (adapters merged, the trained <ACT> row in its embedding table) and its heads.
    forward: the processor's inputs of a batch -> class logits (B, classes); predict: videos -> top-k."""

    # Attention runs in the family's own modules, which support these; PreTrainedModel checks the
    # implementation the shared config names against these flags.
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True
    input_modalities = ("video", "text")

    def __init__(self, config, vlm, heads, manifest, processor):
        super().__init__(config)
        self.vlm = vlm
        self.heads = torch.nn.ModuleDict(heads)  # fp32, as in actcls
        self.manifest, self.processor = manifest, processor
        self.classes = manifest["classes"]
        self.settings = VideoSettings(**manifest["video"])
        self.views = [tuple(v) for v in manifest["views"]]
        self.act_token_id = manifest["act_token_id"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """What AutoModel.from_pretrained(export, trust_remote_code=True) calls. The backbone loads
        through transformers' own class for its family, in the export's dtype unless `dtype` says
        otherwise; `attn_implementation` and `device_map` pass through."""
        directory = local_folder(pretrained_model_name_or_path, kwargs.get("revision"), kwargs.get("token"))
        manifest = read_manifest(directory)
        dtype = kwargs.get("dtype")
        dtype = DTYPES[manifest["dtype"]] if dtype in (None, "auto") else dtype
        vlm = AutoModelForImageTextToText.from_pretrained(
            directory, dtype=dtype, attn_implementation=kwargs.get("attn_implementation", "sdpa"),
            device_map=kwargs.get("device_map"))
        processor = AutoProcessor.from_pretrained(directory)
        processor.tokenizer.padding_side = "right"  # as actcls batches
        act_token_id = processor.tokenizer.convert_tokens_to_ids(ACT_TOKEN)
        if act_token_id != manifest["act_token_id"]:
            raise ExportError(f"{directory}: the tokenizer gives {ACT_TOKEN} id {act_token_id}, the export was made "
                              f"with {manifest['act_token_id']}; export the checkpoint again")
        heads = {space: ActionDecoder.from_pretrained(os.path.join(directory, "heads", space))
                 for space in manifest["heads"]}
        classes = {}
        for space in heads:
            with open(os.path.join(directory, "heads", space, "classes.json"), encoding="utf-8") as f:
                classes[space] = json.load(f)
        return cls(vlm.config, vlm, heads, {**manifest, "classes": classes}, processor).eval()

    def label_space(self, name=None):
        """`name`, or the only head / "default" (inference.VideoClassifier.label_space)."""
        space = name if name is not None else ("default" if "default" in self.heads else next(iter(self.heads)))
        if space not in self.heads:
            raise ValueError(f"label space {space!r}: this classifier has heads {list(self.heads)}")
        return space

    def forward(self, input_ids, label_space=None, **inputs):
        """Class logits (B, classes), fp32, of the processor's inputs (every tensor it returns), each
        row's text ending at <ACT> (chat.prompt_text) and padded on the right."""
        hidden = self.vlm.model(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
        rows = torch.arange(len(input_ids), device=input_ids.device)
        act = hidden[rows, (input_ids == self.act_token_id).int().argmax(1)]
        head = self.heads[self.label_space(label_space)]
        if not head.uses_video:
            return head(act)
        is_video = input_ids == self.vlm.config.video_token_id  # the transformer head reads the video tokens too
        video = torch.nn.utils.rnn.pad_sequence([h[m] for h, m in zip(hidden, is_video)], batch_first=True)
        valid = torch.arange(video.shape[1], device=video.device) < is_video.sum(1, keepdim=True)
        return head(act, video, valid)

    def view_inputs(self, path, view):
        """The processor's tensors for one view of one video file, sampled as in evaluation."""
        info, indices, frames = load_sampled(path, self.settings, None, view)
        text = prompt_text(self.processor, self.manifest["prompt"])
        batch = processor_inputs(self.processor, [text], [(frames, indices, info)])
        return {key: value for key, value in batch.items() if torch.is_tensor(value)}

    @torch.no_grad()
    def probabilities(self, views, label_space):
        """Softmax probabilities averaged over the views' inputs (view_inputs), float64 as actcls."""
        total = 0
        for inputs in views:
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            total = total + self(label_space=label_space, **inputs).float().softmax(-1)[0].cpu().double()
        return total / len(views)

    def predict(self, videos, top_k=5, label_space=None):
        """Video files or folders of videos -> [{"video", "top": [(class name, probability), ...]}] in the
        order given, or {"video", "error"} for a video that cannot be read: what actcls's
        VideoClassifier.predict returns for them."""
        space = self.label_space(label_space)
        names, results = self.classes[space], []
        for video, source in video_files(videos):
            try:
                p = self.probabilities([self.view_inputs(video, view) for view in self.views], space)
            except DataError as e:
                results.append({"video": video, "error": f"{source}: {e}"})
                continue
            top = p.topk(min(top_k, len(p)))
            results.append({"video": video, "top": [(names[c], q) for c, q in zip(top.indices.tolist(),
                                                                                   top.values.tolist())]})
        return results


def video_files(paths):
    """(video, source) for each file, and each video of a folder sorted by name, as VideoClassifier.samples
    lists them; a missing path is said before any video is read."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            raise ExportError(f"{path}: record files need actcls itself (predict.py); pass the video files")
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder")
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += [(os.path.join(path, name), name) for name in sorted(os.listdir(path))
                      if name.lower().endswith(VIDEO_EXTENSIONS)]
        else:
            found.append((os.path.abspath(path), path))
    if not found:
        raise DataError(f"no videos found in {paths}")
    return found


class ActclsVideoClassificationPipeline(Pipeline):
    """pipeline("video-classification", model=EXPORT, trust_remote_code=True): a video path ->
    [{"score", "label"}, ...], best first, as transformers' video-classification pipeline answers.
    The model carries its own processor, so the pipeline loads none. A missing file raises
    FileNotFoundError and an unreadable one ValueError, each naming the file."""

    _load_processor = _load_tokenizer = _load_image_processor = _load_video_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, top_k=None, label_space=None):
        preprocess = {"label_space": label_space} if label_space is not None else {}
        return preprocess, {}, {"top_k": top_k} if top_k is not None else {}

    def preprocess(self, video, label_space=None):
        if not os.path.isfile(video):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", video)
        views = [self.model.view_inputs(video, view) for view in self.model.views]
        return {"views": views, "label_space": self.model.label_space(label_space)}

    def _forward(self, inputs):
        space = inputs["label_space"]
        return {"probabilities": self.model.probabilities(inputs["views"], space), "label_space": space}

    def postprocess(self, outputs, top_k=5):
        names, p = self.model.classes[outputs["label_space"]], outputs["probabilities"]
        top = p.topk(min(top_k, len(p)))
        return [{"score": q, "label": names[c]} for q, c in zip(top.values.tolist(), top.indices.tolist())]
