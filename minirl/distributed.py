"""Data parallelism under torchrun, and the identity without it.

Every rank runs the same training loop on its own problems. After each round of groups the LoRA
gradients are summed over ranks and divided by the number of problems of the step, so all ranks take
the same optimizer step and keep identical weights. T-SPMO's replay buffer is kept identical too: each
rank adds every rank's answers, in rank order (`gather_json`). Without torchrun the world has one rank
and every function below returns its input.

What ranks exchange is tensors, or JSON text carried as bytes in a tensor, so nothing is ever unpickled.
"""

import json
import os

import torch

_device = "cpu"  # where collectives put their tensors: a CUDA device under nccl


def world() -> tuple[int, int]:
    """(rank, world size)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group, nccl on GPUs and gloo on CPUs; returns the
    device this rank uses (cuda:LOCAL_RANK for a CUDA run)."""
    global _device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    _device = device if cuda else "cpu"
    return device


def close():
    if world()[1] > 1:
        torch.distributed.destroy_process_group()


def all_sum(values: list[float]) -> list[float]:
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_max(value: int) -> int:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def gather_json(items: list) -> list:
    """Every rank's `items` (JSON-serialisable), concatenated in rank order."""
    if world()[1] == 1:
        return items
    data = torch.tensor(list(json.dumps(items).encode()), dtype=torch.uint8, device=_device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=_device) for _ in range(world()[1])]
    torch.distributed.all_gather(sizes, torch.tensor([len(data)], device=_device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=_device)
    padded[:len(data)] = data
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return [item for part, size in zip(parts, sizes) for item in json.loads(bytes(part[:int(size.item())].tolist()))]


def average_gradients(params, n_problems: int):
    """grad ← (Σ over ranks of grad) / n_problems: every problem of the step weighs the same."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world()[1] > 1:
            torch.distributed.all_reduce(p.grad)
        p.grad /= n_problems


def barrier():
    if world()[1] > 1:
        torch.distributed.barrier()
