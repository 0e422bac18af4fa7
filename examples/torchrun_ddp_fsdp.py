"""Data-parallel training with AMAdamW under torchrun: DDP or FSDP2 (fully_shard), with checkpoints.

    torchrun --nproc-per-node=4 examples/torchrun_ddp_fsdp.py --mode fsdp
    torchrun --nproc-per-node=2 examples/torchrun_ddp_fsdp.py --mode ddp --steps 50
    torchrun --nproc-per-node=2 examples/torchrun_ddp_fsdp.py --mode fsdp --cpu     # gloo, no GPU
    torchrun --nproc-per-node=2 examples/torchrun_ddp_fsdp.py --steps 10 --save ckpt          # then resume:
    torchrun --nproc-per-node=2 examples/torchrun_ddp_fsdp.py --steps 20 --load ckpt          # steps 10..19

DDP: every rank holds the whole model and DDP averages the gradients, so the step needs nothing more
(no process group is involved in beta). FSDP2: parameters are DTensor shards; the optimizer finds the
shard group from the device mesh and all-reduces beta's per-scope sums over it (one small all_reduce
per step, no host sync), so every rank computes the whole model's beta. Under HSDP
(`init_device_mesh(..., (replicas, shards))`) that is the shard dimension's group; pass
`process_group=` to name another. Every backend reduces the sums ("auto" picks the fastest).

Checkpoints go through torch.distributed.checkpoint, each rank writing its shards, in the flattened
form torchtitan and OLMo-core use (`flatten_optimizer_state_dict=True`); the optimizer's beta scope
state (step counts, beta) rides in each parameter's state entry, so a resumed run continues exactly
as the run without a checkpoint would.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from amm_kernels import AMAdamW

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def save(folder, model, opt, step):
    model_sd, optim_sd = get_state_dict(model, opt, options=OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)}, checkpoint_id=folder)


def load(folder, model, opt) -> int:
    """Load into a fresh model and optimizer (DCP fills the dicts they give it); returns the next step."""
    model_sd, optim_sd = get_state_dict(model, opt, options=OPTIONS)
    loaded = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    dcp.load(loaded, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=OPTIONS)
    return int(loaded["step"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
    parser.add_argument("--save", metavar="DIR", help="checkpoint the model and optimizer here at the end")
    parser.add_argument("--load", metavar="DIR", help="resume from a checkpoint --save wrote")
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

    target = torch.nn.Linear(64, 8)  # seeded above: the same on every rank
    opt = AMAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # FSDP2: the group comes from the mesh
    start = load(args.load, model, opt) if args.load else 0
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data, the same on resume
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
    if args.save:
        save(args.save, model, opt, args.steps)
    dist.barrier()  # every rank has finished its steps
    if rank == 0:
        print(f"{world} ranks done", flush=True)
    # Drop the model while the default group still exists. Seen with torch 2.13 on CPU (gloo), on a loaded
    # machine: when main() returned, DDP's C++ reducer dropped the group's last reference with the GIL held,
    # whose destructor joins gloo's worker threads, one of which waited for the GIL to free a finished
    # collective's tensors: the rank hung at exit after "done" (gdb; pytorch/pytorch#56297). With this
    # line: no hang in 20 such launches, 4 in 16 without it.
    del model, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
