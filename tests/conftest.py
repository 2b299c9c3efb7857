"""Shared fixtures: tiny random models built from transformers configs (no network)."""
from __future__ import annotations

import socket

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA exists; elsewhere they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own dequantization, as one flat row reshaped: on AVX-512 CPUs its native kernel
    (0.50) misplaces the blocks of rows that are not made of whole blocks, and a flat row has none."""
    import copy

    import bitsandbytes.functional as bnbf

    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def _build(model_cls, config, dtype, seed):
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.eval()
    return model


def make_llama(dtype=torch.float32, seed=0, **overrides):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**cfg), dtype, seed)


def make_gpt2(dtype=torch.float32, seed=0, **overrides):
    """A 2-layer GPT-2 (Conv1D projections, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    cfg.update(overrides)
    return _build(GPT2LMHeadModel, GPT2Config(**cfg), dtype, seed)


def make_bert_classifier(dtype=torch.float32, seed=0, **overrides):
    """A 2-layer BERT with a 3-way sequence-classification head."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, max_position_embeddings=256, num_labels=3)
    cfg.update(overrides)
    return _build(BertForSequenceClassification, BertConfig(**cfg), dtype, seed)


MODEL_FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_classifier}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def any_model_factory(request):
    """Parametrises a test over the three tiny architectures."""
    return MODEL_FACTORIES[request.param]


def loss_of(model, batch):
    """The model's own loss: next-token for causal LMs, 3-way labels for classifiers."""
    from peftlab import PeftModel

    base = model.base_model if isinstance(model, PeftModel) else model  # HF models have a base_model too
    if type(base).__name__.endswith("ForSequenceClassification"):
        labels = torch.arange(batch["input_ids"].shape[0]) % 3
    else:
        labels = batch["input_ids"]
    return model(**batch, labels=labels).loss


def train_steps(model, batch, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the trainable parameters; returns the loss before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


def one_line_error(args: list[str]) -> str:
    """Run the CLI in-process; assert exit code 2 and a single ``error:`` line without a traceback."""
    from typer.testing import CliRunner

    from peftlab.cli.app import app, main_commands

    main_commands()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture
def token_batch():
    """A fixed batch of token ids and attention mask (batch 2, length 12)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def free_port() -> int:
    """A free TCP port on localhost, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
