"""The run's log: metrics.jsonl (what tests and users parse) on rank 0, plus what report_to asks
for: TensorBoard events in output_dir and/or a wandb run (wandb is optional: imported only when asked).

    log = MetricsLog(cfg, enabled=rank == 0, after_step=resumed_step)
    log.log(step, "train", loss=0.41, lr=1e-4)          # metrics.jsonl + tags train/loss, train/lr
    log.log(step, "val", dataset="ucf101", top1=0.8)    # ... + tag val/ucf101/top1
    log.image(step, "val/ucf101/confusion", make_png); log.close()
"""

import dataclasses
import importlib.util
import json
import os

from checkpoint import write_text
from config import ConfigError, report_targets


class MetricsLog:
    def __init__(self, cfg, enabled, after_step=0):
        """Appends to metrics.jsonl (always: tests and users parse it); on resume, first drops the
        lines logged after the checkpoint (they will be logged again), so the file reads as one
        uninterrupted run. report_to adds TensorBoard events in output_dir and/or a wandb run."""
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        path = os.path.join(cfg.output_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
        write_text(path, "".join(kept))
        self.file = open(path, "a")
        targets = report_targets(cfg.report_to)
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(cfg.output_dir, purge_step=after_step + 1 if after_step else None)
        if "wandb" in targets and wandb_mode() != "disabled":
            self.wandb = start_wandb(cfg)

    def log(self, step, split, **values):
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
            self.file.flush()
        except OSError as e:  # name the file: a failed write() names none
            raise OSError(e.errno, e.strerror, self.file.name) from None
        scalars = scalar_tags(split, values)
        for tag, v in scalars.items():
            if self.tb is not None:
                self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def image(self, step, tag, make):
        """An image for TensorBoard / wandb; `make()` returns an HWC uint8 array and runs on rank 0 only."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        picture = make()
        if self.tb is not None:
            self.tb.add_image(tag, picture, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(picture)}, step=step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def scalar_tags(split, values):
    """{TensorBoard / wandb tag: value} for a metrics.jsonl line's numbers: `val/<dataset>/top1` for
    an eval dataset's line (each eval dataset its own curve), `train/loss` otherwise."""
    prefix = f"{split}/{values['dataset']}" if "dataset" in values else split
    return {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def wandb_mode():
    return os.environ.get("WANDB_MODE", "online").strip().lower()


def check_reporters(cfg):
    """On every rank, before any step: report_to: wandb needs the optional wandb package (it is not
    in requirements.txt), unless WANDB_MODE=disabled turns wandb off anyway."""
    if "wandb" in report_targets(cfg.report_to) and wandb_mode() != "disabled":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("report_to: wandb needs the wandb package, which is optional: pip install wandb "
                              "(or report_to: tensorboard / none, or WANDB_MODE=disabled)")


def start_wandb(cfg):
    """A wandb run on rank 0 with the resolved config. WANDB_MODE=offline writes it under
    output_dir/wandb/ (`wandb sync` uploads it later); WANDB_PROJECT picks the project (default
    actcls). Each launch, a resume too, is its own wandb run, grouped by run_name."""
    import wandb  # optional: imported only when report_to asks for it

    name = cfg.run_name if cfg.run_name is not None else os.path.basename(os.path.abspath(cfg.output_dir))
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "actcls"), name=name, group=name,
                          dir=cfg.output_dir, config=dataclasses.asdict(cfg), job_type="train")
    except wandb.errors.Error as e:  # no API key, no network: before any step, say what to do
        raise ConfigError(f"report_to: wandb: wandb.init failed ({type(e).__name__}: {e}). Run `wandb login`, or "
                          f"set WANDB_MODE=offline (sync later) or WANDB_MODE=disabled") from None
