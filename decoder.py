"""ActionDecoder: the classification head on the <ACT> hidden state.

Kept in fp32 whatever the backbone's dtype: it is tiny, and its logits feed the loss directly.
`save_pretrained(dir)` writes `action_decoder.safetensors` + `action_decoder.json` (the constructor
arguments), so `ActionDecoder.from_pretrained(dir)` rebuilds it without the training config.

Types:
- `linear`, `mlp`: a function of the <ACT> state alone.
- `transformer` (IVCP's head, same layout and parameter names): the <ACT> state is projected and put
  first, the video tokens' last-layer states follow it; pre-norm transformer layers run over that
  sequence, and the first output goes through a final norm and an MLP to the classes. Padded video
  positions are masked out as keys, so a sample's logits do not depend on what it is batched with.
- `transformer_no_vision`: the same layers over the projected <ACT> state alone (IVCP's control).
"""

import json
import os

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DECODER_TYPES = ("linear", "mlp", "transformer", "transformer_no_vision")
TRANSFORMER_TYPES = ("transformer", "transformer_no_vision")
WEIGHTS_FILE = "action_decoder.safetensors"  # IVCP's ActionDecoder writes a file of the same name, without the json


class TransformerLayer(nn.Module):
    """Pre-norm self-attention + MLP (4x wide, GELU), dropout in both, as IVCP's head layer."""

    def __init__(self, hidden_size, num_heads, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * hidden_size, hidden_size), nn.Dropout(dropout))

    def forward(self, x, padding=None):
        # x: (B, S, hidden); padding: (B, S) True where a position is padding (never attended to)
        y = self.norm1(x)
        x = x + self.attn(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ActionDecoder(nn.Module):
    def __init__(self, hidden_size, num_classes, decoder_type="linear", mlp_hidden_size=None,
                 num_transformer_layers=2, num_heads=8, dropout=0.1):
        super().__init__()
        if decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {decoder_type!r}")
        self.config = dict(hidden_size=hidden_size, num_classes=num_classes, decoder_type=decoder_type,
                           mlp_hidden_size=mlp_hidden_size)
        inner = mlp_hidden_size if mlp_hidden_size is not None else hidden_size
        if decoder_type == "linear":
            self.net = nn.Linear(hidden_size, num_classes)
        elif decoder_type == "mlp":
            self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, num_classes))
        else:
            if hidden_size % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
            # recorded for transformer heads only: linear and mlp heads have no such layers
            self.config.update(num_transformer_layers=num_transformer_layers, num_heads=num_heads, dropout=dropout)
            self.projection = nn.Linear(hidden_size, hidden_size)
            self.transformer_layers = nn.ModuleList(
                TransformerLayer(hidden_size, num_heads, dropout) for _ in range(num_transformer_layers))
            self.final_norm = nn.LayerNorm(hidden_size)
            self.head = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(inner, num_classes))

    @property
    def uses_video(self):
        """Whether forward needs the video tokens' states."""
        return self.config["decoder_type"] == "transformer"

    def forward(self, hidden, video=None, video_mask=None):
        """hidden: (B, hidden_size) <ACT> states in the backbone's dtype -> (B, num_classes) fp32 logits.
        video, video_mask (transformer only): (B, N, hidden_size) the video tokens' states, padded to
        the batch's longest, and (B, N) True where a state is real."""
        if self.config["decoder_type"] in ("linear", "mlp"):
            return self.net(hidden.float())
        x = self.projection(hidden.float()).unsqueeze(1)  # (B, 1, hidden): the sequence's first token
        padding = None
        if self.uses_video:
            if video is None or video_mask is None:
                raise ValueError("the transformer head needs the video tokens' states and their mask")
            x = torch.cat([x, video.float()], dim=1)
            padding = torch.cat([torch.zeros_like(video_mask[:, :1]), ~video_mask], dim=1)
        for layer in self.transformer_layers:
            x = layer(x, padding)
        return self.head(self.final_norm(x[:, 0]))

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "action_decoder.safetensors"))
        with open(os.path.join(directory, "action_decoder.json"), "w") as f:
            json.dump(self.config, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory):
        with open(os.path.join(directory, "action_decoder.json")) as f:
            decoder = cls(**json.load(f))
        decoder.load_state_dict(load_file(os.path.join(directory, "action_decoder.safetensors")))
        return decoder


def ivcp_decoder_type(directory):
    """The head type of an IVCP ActionDecoder.save_pretrained folder (weights only, keys `head.*`, no
    action_decoder.json): "linear", "mlp" or "transformer"; None when the folder holds no such file."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(os.path.join(directory, "action_decoder.json")) or not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    if keys == {"head.weight", "head.bias"}:
        return "linear"
    if keys == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}:
        return "mlp"
    return "transformer"  # projection.*, transformer_layers.*, final_norm.*, head.*


def from_ivcp(directory):
    """An IVCP linear or mlp head as an ActionDecoder: the same layers under `head` instead of `net`
    (Linear, or Linear-GELU-Linear), so only the names change; the sizes come from the weights."""
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    state = {"net" + key[len("head"):]: value for key, value in state.items()}
    if "net.weight" in state:
        num_classes, hidden_size = state["net.weight"].shape
        decoder = ActionDecoder(hidden_size, num_classes, "linear")
    else:
        inner, hidden_size = state["net.0.weight"].shape
        decoder = ActionDecoder(hidden_size, state["net.2.weight"].shape[0], "mlp", inner)
    decoder.load_state_dict(state)
    return decoder
