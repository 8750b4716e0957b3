"""Two gloo processes on 127.0.0.1 train exactly like one process with the whole meta-batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.test_training import folder_config

pytestmark = pytest.mark.integration      # CLI runs, training runs, processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, config, run_dir):
    import torch.distributed as dist

    from metamap.train.run import train
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        train(config, run_dir, progress=False, run_test=True, echo=lambda *_: None, rank=rank,
              world_size=world_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("learner", ["protonet", "maml"])
def test_two_ranks_equal_one_process(image_folder, tmp_path, learner):
    from metamap.train.run import train
    # SGD, not Adam: conv biases before BatchNorm have a true gradient of zero, and Adam would
    # blow their rounding noise (which differs with the summation order) up to full-size steps.
    config = folder_config(image_folder, steps=6, **{"learner.name": repr(learner), "train.threads": 1,
                                                     "episode.tasks_per_batch": 5, "train.val_every": 3,
                                                     "optim.name": "'sgd'", "optim.lr": 0.05,
                                                     "train.precision": "'fp32'"})   # bf16 rounding > 1e-4
    single = tmp_path / "single"
    one = train(config, single, progress=False, echo=lambda *_: None)
    double = tmp_path / "double"
    mp.start_processes(_rank_main, args=(2, free_port(), config, double), nprocs=2, start_method="spawn")
    a, b = load_file(single / "last" / "weights.safetensors"), load_file(double / "last" / "weights.safetensors")
    for k in a:
        if k.endswith("num_batches_tracked"):
            continue
        if "running" in k:       # per-rank running statistics are averaged, not chained: close, not equal
            continue
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    two = __import__("json").loads((double / "results.json").read_text())
    assert two["test"][0]["episodes"] == one["test"][0]["episodes"]
