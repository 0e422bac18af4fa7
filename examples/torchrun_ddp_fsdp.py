"""Data-parallel training with AMAdamW under torchrun: DDP or FSDP2 (fully_shard).

    torchrun --nproc-per-node=4 examples/torchrun_ddp_fsdp.py --mode fsdp
    torchrun --nproc-per-node=2 examples/torchrun_ddp_fsdp.py --mode ddp --steps 50
    torchrun --nproc-per-node=2 examples/torchrun_ddp_fsdp.py --mode fsdp --cpu     # gloo, no GPU

DDP: every rank holds the whole model and DDP averages the gradients, so the step needs nothing more
(no process group is involved in beta). FSDP2: parameters are DTensor shards; the optimizer finds the
shard group from the device mesh and all-reduces beta's per-scope sums over it (one small all_reduce
per step, no host sync), so every rank computes the whole model's beta. Under HSDP
(`init_device_mesh(..., (replicas, shards))`) that is the shard dimension's group; pass
`process_group=` to name another. Every backend reduces the sums ("auto" picks the fastest).
"""
import argparse
import os

import torch
import torch.distributed as dist

from amm_kernels import AMAdamW


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)
    ).to(device)
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)

    opt = AMAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # FSDP2: the group comes from the mesh
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    target = torch.nn.Linear(64, 8)
    for step in range(args.steps):
        x = torch.randn(32, 64, generator=gen)
        with torch.no_grad():
            y = target(x)
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            # Reading beta (and the loss) here, outside step(), is the only host sync of the logging.
            summed = loss.detach().clone()
            dist.all_reduce(summed)
            if rank == 0:
                print(f"step {step:4d}  loss {summed.item() / world:.4f}  beta mean {opt.beta.mean().item():.4f}",
                      flush=True)
    dist.barrier()  # every rank has finished its steps
    if rank == 0:
        print(f"{world} ranks done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
