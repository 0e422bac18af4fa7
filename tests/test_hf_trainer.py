"""Hugging Face Trainer: a tiny randomly initialised Llama (built from a config, nothing downloaded) trains
with AMAdamW on a few hundred sequences, and with each optimizer a run resumed from its checkpoint matches
the run without one. Skipped when transformers is not installed."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from _helpers import coefficients  # noqa: E402
from amm_kernels import RLLC, AMAdamW, AMSGD  # noqa: E402

VOCAB, SEQ, N = 64, 32, 256


class Sequences(torch.utils.data.Dataset):
    """Counting sequences mod VOCAB with a random start and stride: learnable in a few steps."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (N, 1), generator=gen)
        stride = torch.randint(1, 4, (N, 1), generator=gen)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(config)


def test_trainer_trains_a_tiny_llama_with_amadamw(tmp_path):
    model = _tiny_llama()
    opt = AMAdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=2, logging_steps=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(), optimizers=(opt, None))
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 2 * N // 16
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # it learns (ln 64 = 4.16 at the start)
    assert torch.isfinite(opt.beta).all() and bool((opt._scopes.step == result.global_step).all())


def _train(make_opt, output_dir, save_steps=None, resume=None, max_steps=12):
    """The model, the optimizer, and how many times this run called its step()."""
    model = _tiny_llama()
    opt = make_opt(model.parameters())
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=16, max_steps=max_steps, logging_steps=1000,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or max_steps, report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Sequences(), optimizers=(opt, None)).train(
        resume_from_checkpoint=resume)
    return model, opt, len(calls)


@pytest.mark.parametrize("make_opt", [
    lambda params: AMAdamW(params, lr=3e-3, weight_decay=0.01),
    lambda params: AMSGD(params, lr=0.1),
    lambda params: RLLC(params, lr=0.1),
], ids=["AMAdamW", "AMSGD", "RLLC"])
def test_trainer_resumed_from_its_checkpoint_matches_the_run_without_one(make_opt, tmp_path):
    """resume_from_checkpoint: the Trainer saves optimizer.state_dict() with torch.save and loads it into a
    fresh optimizer; 6 steps, a checkpoint, 6 more give the parameters of 12 steps without one, bit for bit."""
    straight, straight_opt, _ = _train(make_opt, tmp_path / "straight")
    _train(make_opt, tmp_path / "saving", save_steps=6)
    resumed, resumed_opt, steps = _train(make_opt, tmp_path / "resumed", resume=tmp_path / "saving" / "checkpoint-6")
    assert steps == 6  # it resumed (a run that ignored the checkpoint would step 12 times, to the same parameters)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), _tiny_llama().parameters()))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(coefficients(straight_opt), coefficients(resumed_opt))
