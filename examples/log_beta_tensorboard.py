"""Log AMAdamW's beta (and the loss) to TensorBoard every few steps, with no host sync inside step().

    pip install tensorboard
    python examples/log_beta_tensorboard.py --logdir runs/amm && tensorboard --logdir runs/amm

`optimizer.beta` is a device tensor (0-d for beta_scope="global", one per group / tensor otherwise;
AMAdamW's default is one per parameter tensor): step() never reads it back. Read it only when you log; for fewer syncs, keep the betas of the steps
between two logs on the device (torch.stack) and move them in one copy.
"""
import argparse

import torch

from amm_kernels import AMAdamW


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", default="runs/amm_beta")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is optional
        raise SystemExit(f"this example needs tensorboard: pip install tensorboard ({err})")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)).to(device)
    opt = AMAdamW(model.parameters(), lr=3e-3)
    writer = SummaryWriter(args.logdir)
    w_true = torch.randn(32, 1, device=device)
    pending_betas, pending_losses = [], []  # device tensors: nothing is synchronised until the log step
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 32, device=device)
        loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x @ w_true))
        loss.backward()
        opt.step()
        opt.zero_grad()
        pending_betas.append(opt.beta)   # a copy on the device: no sync
        pending_losses.append(loss.detach())
        if step % args.log_every == 0:
            betas = torch.stack(pending_betas).cpu()   # one device-to-host copy per log
            losses = torch.stack(pending_losses).cpu()
            for i, (b, l) in enumerate(zip(betas, losses)):
                at = step - len(betas) + 1 + i
                if b.numel() == 1:  # beta_scope="global"
                    writer.add_scalar("amm/beta", float(b), at)
                else:  # one beta per group / tensor: their mean, min and max, and a histogram
                    writer.add_scalars("amm/beta", {"mean": float(b.mean()), "min": float(b.min()),
                                                    "max": float(b.max())}, at)
                    writer.add_histogram("amm/beta_per_scope", b, at)
                writer.add_scalar("train/loss", float(l), at)
            pending_betas.clear(), pending_losses.clear()
    writer.close()
    print(f"logged {args.steps} steps to {args.logdir}; last betas {[round(b, 4) for b in opt.beta.reshape(-1).tolist()]}")


if __name__ == "__main__":
    main()
