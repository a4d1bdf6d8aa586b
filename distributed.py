"""The distributed setup: one process group for torchrun and for a plain `python train.py` (a world
of one), rank-0 printing, the collectives the scripts use, and FSDP2 sharding.

    rank, world, device = setup(timeout_s)   # gloo on CPU, nccl on GPU
    print0("only rank 0 prints this")
    sums = all_reduce_sums([loss_sum, count], device)
    teardown()

Everything else (train.py, evaluation.py, inference.py) reads rank and world from here, never from
the environment: torchrun's variables are read once, in `setup`.
"""

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from config import ConfigError


def setup(timeout_s=1800):
    """Joins the process group. Under torchrun its variables say the rank and the rendezvous; a plain
    `python script.py` is a world of one on an in-process store (no port, no environment written).
    timeout_s (ddp_timeout): how long the rendezvous and every collective wait for the other ranks
    (PyTorch's default is 30 min; a slow first evaluation or a shared-disk stall can need more).
    Returns (rank, world, device)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    cuda = torch.cuda.is_available()
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        local_rank, local_world = 0, 1
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if cuda:
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except dist.DistStoreError as e:  # the other ranks (nodes) never came: say which setting waited
            raise SystemExit(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: the other ranks did not "
                             f"join within ddp_timeout={timeout_s}s ({e}). Start every node's torchrun with the "
                             f"same --nnodes and rendezvous endpoint, or raise ddp_timeout.") from None
    if not cuda and local_world > 1:  # share the CPU cores between the local ranks instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # them (alone: torch's default)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only (nanochat's print0); flushed, so ranks' lines do not lag behind."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def all_reduce_sums(values, device):
    """Element-wise sums over the ranks (float64, so counts stay exact). A collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj):
    """Every rank's `obj`, in rank order (picklable objects). A collective."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (picklable). A collective."""
    sent = [obj]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


def check_shared_output_dir(output_dir, rank, world, wait_s=5.0):
    """Multi-node runs need output_dir on storage every node sees: rank 0 creates each checkpoint's
    folder and every rank writes its RNG state into it; a resume reads it on every rank. Checked
    before any step: rank 0 writes a marker with a fresh token, every rank must find it (listing the
    folder, which makes NFS revalidate its cache; polled for `wait_s`). A collective: all ranks
    raise the same ConfigError when one cannot see it."""
    if world == 1:
        return
    sent = [(f"{time.time_ns()}-{os.getpid()}", socket.gethostname()) if rank == 0 else None]
    dist.broadcast_object_list(sent, src=0)
    (token, writer), = sent
    marker = f".shared_check_{token}"
    if rank == 0:
        with open(os.path.join(output_dir, marker), "w") as f:
            f.write(socket.gethostname())
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not (seen := marker in os.listdir(output_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = all_gather(None if seen else (rank, socket.gethostname(), os.path.abspath(output_dir)))
    dist.barrier()  # every rank has looked: the marker can go
    if rank == 0:
        os.remove(os.path.join(output_dir, marker))
    blind = [b for b in blind if b is not None]
    if blind:
        where = ", ".join(f"rank {r} on {host} (looked in {path})" for r, host, path in blind)
        raise ConfigError(f"output_dir {output_dir} is not shared between the nodes: {where} cannot see the file "
                          f"rank 0 wrote there on {writer}. Multi-node "
                          f"runs need output_dir on storage every node mounts at the same path (NFS, Lustre, a "
                          f"mounted bucket): every rank writes into the checkpoints rank 0 creates, and a resume "
                          f"reads them on every node.")


# ---------------------------------------------------------------------------------------------------
# FSDP2 (train.py's `fsdp: true`): sharding the classifier over the ranks

def shard_fsdp(model, device, world):
    """FSDP2 (`fully_shard`) for models that do not fit with DDP: each rank holds 1/world of every
    parameter, gradient and Adam moment. Each language-model decoder layer and each vision block is
    a unit (all-gathered just before it runs, freed after), then the root takes the rest (embedding
    table, patch embedding, merger, final norm, <ACT> row, heads). In place: `model` keeps its methods
    and parameter names, but its parameters become DTensor shards, so weights are loaded before this
    and the optimizer is built after it. Returns `model`: it is its own wrapper."""
    trained = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    if len(trained) > 1:  # a unit's gradients are reduce-scattered as one flat buffer of one dtype
        raise ConfigError(f"fsdp: the trained parameters are {trained}; FSDP2 needs one dtype")
    with torch.no_grad():  # rank 0's weights everywhere, as DDP does (each rank seeded its random inits apart)
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device.type, (world,))
    for block in [*model.backbone.language_model.layers, *model.backbone.visual.blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard_fsdp(model):
    """Before gathering whole tensors for a checkpoint. An eval forward leaves FSDP2's root unit
    unsharded (it reshards the root after backward only), with plain tensors where the optimizer's
    DTensors belong: reshard, so names and optimizer parameters line up again. No-op without FSDP2."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
