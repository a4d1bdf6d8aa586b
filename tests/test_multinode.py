"""Multi-node launch on one machine: two torchrun launchers (`--nnodes 2 --nproc_per_node 1`) that
meet at a c10d rendezvous on localhost act as two nodes of one process each."""

import os
import random
import subprocess
import sys

import train
from test_resume import ROOT, assert_same_training, checkpoint_is_complete


def two_nodes(args_of_node, timeout=400):
    """Starts one torchrun per node (args_of_node: [node 0's train.py args, node 1's]) and waits for
    both. Returns their CompletedProcess-like (returncode, output) pairs."""
    port, run_id = random.randint(20000, 40000), f"two-nodes-{random.randint(0, 10**9)}"
    procs = []
    for node, args in enumerate(args_of_node):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
               "--rdzv-id", run_id, os.path.join(ROOT, "train.py")] + args
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, output))
    return results


def test_two_nodes_train_save_and_resume_like_one_process(base_args, tmp_path):
    """2 nodes x 1 rank x 2 clips == 1 process x 4 clips; the 2-node run stops at step 2 with one
    whole checkpoint (both ranks' RNG state in it) and a second pair of launchers resumes it."""
    common = base_args + ["--eval_datasets", "[]", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
    single, nodes = str(tmp_path / "single"), str(tmp_path / "nodes")
    train.main(common + ["--max_steps", "4", "--per_device_train_batch_size", "4", "--output_dir", single])

    two = common + ["--per_device_train_batch_size", "2", "--output_dir", nodes]
    first = two_nodes([two + ["--max_steps", "2"]] * 2)
    assert all(code == 0 for code, _ in first), "\n".join(out[-3000:] for _, out in first)
    folder = os.path.join(nodes, "checkpoints", "step_0000002")
    assert checkpoint_is_complete(folder) == 2
    assert sorted(n for n in os.listdir(folder) if n.startswith("rng_rank")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert not [n for n in os.listdir(nodes) if n.startswith(".shared_check_")]  # the marker is cleaned up

    second = two_nodes([two + ["--max_steps", "4", "--resume", "auto"]] * 2)
    assert all(code == 0 for code, _ in second), "\n".join(out[-3000:] for _, out in second)
    assert any("resumed from" in out and "at step 2" in out for _, out in second)
    assert_same_training(single, nodes)


def test_output_dir_not_shared_between_nodes_stops_before_any_step(base_args, tmp_path):
    """Node-local disks simulated by giving each node its own output_dir: the path rank 0 writes to
    is not the storage the other rank reads. Both stop with the message, nothing trained or saved."""
    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    results = two_nodes([base_args + ["--max_steps", "2", "--eval_datasets", "[]", "--output_dir", out]
                         for out in outs])
    assert all(code != 0 for code, _ in results)
    output = "\n".join(out for _, out in results)
    assert "is not shared between the nodes" in output and "cannot see the file rank 0 wrote" in output
    assert 'train.py", line' not in output  # no traceback through actcls (torchrun prints its ChildFailedError)
    for out in outs:
        assert not os.path.exists(os.path.join(out, "checkpoints")) and not os.path.exists(
            os.path.join(out, "metrics.jsonl"))
