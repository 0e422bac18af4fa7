"""A one-process gloo group, for the sharded code path of the fused backends without a second process.

With a process_group the fused backends run a step as three parts: the scope-sums op (pass 1 and the
per-scope sums), one all_reduce of those sums, and the step op from the sums (csrc/cpu/step_driver_cpu.cpp
NOTE [sharded sums]). On one rank the all_reduce adds nothing, so that path must give exactly the
result of the one-op step: the tests compare the two bit for bit. tests/test_distributed.py checks
the reduction itself with two processes.
"""
import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_rank_group():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("a process group of several ranks is already initialised in this process")
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank_nccl_group(one_rank_group):
    """A one-rank NCCL group beside the gloo one (GPU only): the sums all-reduced by NCCL, as in
    multi-GPU training. One rank adds nothing, so the split step must again equal the one-op step;
    what it shows is that NCCL takes the float64 sums tensor where the step leaves it, inside step()."""
    import torch

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs a GPU and NCCL")
    torch.cuda.set_device(0)
    group = dist.new_group([0], backend="nccl")
    yield group
    dist.destroy_process_group(group)
