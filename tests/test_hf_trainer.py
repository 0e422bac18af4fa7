"""Hugging Face Trainer with AMAdamW: a tiny randomly initialised Llama (built from a config, nothing
downloaded) trains on a few hundred sequences. Skipped when transformers is not installed."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from amm_kernels import AMAdamW  # noqa: E402

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


def test_trainer_trains_a_tiny_llama_with_amadamw(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    model = transformers.LlamaForCausalLM(config)
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
