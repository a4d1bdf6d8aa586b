"""DataLoaders: the processes that decode videos while the model runs, and the training stream.

    loader = make_loader(dataset, batches, collate, num_workers, seed)   # evaluation, inference
    for epoch, position, batch in batch_stream(mix, collate, cfg, layout, start): ...   # training

Workers start from a forkserver, ignore Ctrl-C (the trainer saves first) and exit with the trainer
however it dies (exit_with_trainer), so a kill never leaves a process behind.
"""

import multiprocessing
import os
import signal
import threading

import torch

from batch_plan import EpochBatches
from data import sample_lengths, video_text_per_group


def ignore_ctrl_c(worker_id):
    """A Ctrl-C in a terminal signals the whole process group. The trainer handles it (finishes the
    step, saves); a worker that died of it would crash the run before the save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_with_trainer():
    """In a DataLoader worker: exit as soon as the trainer is gone, however it went (SIGKILL, the OOM
    killer). PyTorch's own check, `os.getppid()` changing, never fires under a forkserver: a worker's
    parent is the forkserver, which exits only on EOF of its "alive" pipe, and every worker holds that
    pipe's write end. So a killed trainer left the forkserver, its workers and the resource tracker
    (whose pipe the workers hold too) waiting on each other forever. multiprocessing gives each child
    a sentinel of the process that started it: a pipe whose write end only the trainer holds, at EOF
    once it is gone, whatever the start method. A thread blocked on it costs nothing and misses
    nothing: a trainer that died before this ran has left the EOF there already. With the workers
    gone the forkserver and the resource tracker see their EOFs and exit (1-3 s); a forkserver still
    importing its preload modules when the trainer died exits once they are imported (~5 s)."""
    trainer = multiprocessing.parent_process()
    if trainer is not None:
        threading.Thread(target=_exit_after, args=(trainer,), name="exit-with-trainer", daemon=True).start()


def _exit_after(process):
    process.join()  # returns on the sentinel's EOF
    os._exit(1)  # nobody is left to take a batch, so nothing to clean up


def init_worker(worker_id):
    ignore_ctrl_c(worker_id)
    exit_with_trainer()


def make_loader(dataset, batches, collate, num_workers, seed):
    """Workers start from a forkserver, not a fork of the training process: forking a process that
    runs threads (TensorBoard's writer, FFmpeg's, OpenMP's) can copy a held lock into the child and
    hang it. They persist, so they start once. Its own generator: creating an iterator must not draw
    from the global RNG (dropout's), or a resumed run would drift from an uninterrupted one."""
    context = None
    if num_workers:
        context = torch.multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "transformers", "data", "loaders"])  # imported once, in the server
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                                       multiprocessing_context=context, persistent_workers=num_workers > 0,
                                       worker_init_fn=init_worker if num_workers else None,
                                       generator=torch.Generator().manual_seed(seed),
                                       prefetch_factor=4 if num_workers else None)


def batch_stream(mix, collate, cfg, layout, start):
    """Yields (epoch, position, batch) from start = (epoch, position) on, where (epoch, position) is
    where the next batch comes from: what a checkpoint records to resume mid-epoch."""
    lengths = None
    if cfg.group_by_length:  # one probe per clip, once
        lengths = sample_lengths(mix.dataset, video_text_per_group(collate.processor, collate.act_token_id))
    plan = EpochBatches(mix, layout, cfg.seed, start, lengths)
    epoch, position = start
    for batch in make_loader(mix.dataset, plan, collate, cfg.dataloader_num_workers, cfg.seed):
        position += 1
        if position == plan.per_epoch:
            epoch, position = epoch + 1, 0
        yield epoch, position, batch
