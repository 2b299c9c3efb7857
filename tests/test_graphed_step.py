"""GraphedStep: the same training as an eager loop, eagerly on CPU and replayed as a CUDA graph on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import peftlab
from peftlab import LoraConfig
from peftlab.errors import ConfigError
from peftlab.train import GraphedStep, causal_lm_loss

from .conftest import free_port, make_llama


def _batches(n: int, device: str) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=gen).to(device)} for _ in range(n)]


def _lora_model(device: str, dtype: torch.dtype, quantized: bool = False):
    model = make_llama(dtype=dtype).to(device)
    if quantized:
        peftlab.quantize(model, compute_dtype=dtype)
    wrapped = peftlab.wrap(model, LoraConfig(r=4, init="random"))
    wrapped.enable_gradient_checkpointing(preserve_rng_state=False)  # no dropout: exact, and graph-safe
    wrapped.train()
    return wrapped


def _train(wrapped, batches, graphed: bool, device: str) -> tuple[list[float], list[torch.Tensor]]:
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2, capturable=device == "cuda")
    loss_fn = lambda batch: causal_lm_loss(wrapped.base_model, batch["input_ids"], chunk_size=8)  # noqa: E731
    step = GraphedStep(optimizer, loss_fn, warmup=2, enabled=graphed)
    losses = [step(batch).item() for batch in batches]
    return losses, [p.detach().clone() for p in wrapped.trainable_parameters()], step


def test_eager_fallback_on_cpu_is_an_ordinary_training_loop():
    batches = _batches(4, "cpu")
    losses, params, step = _train(_lora_model("cpu", torch.float32), batches, graphed=True, device="cpu")
    assert step.captured_shapes == 0
    # the same loop written by hand
    wrapped = _lora_model("cpu", torch.float32)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
    expected = []
    for batch in batches:
        loss = causal_lm_loss(wrapped.base_model, batch["input_ids"], chunk_size=8)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert losses == expected
    for got, want in zip(params, wrapped.trainable_parameters()):
        assert torch.equal(got, want)
    assert expected[-1] < expected[0]


def test_bad_settings_are_refused():
    wrapped = _lora_model("cpu", torch.float32)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="warmup is 0"):
        GraphedStep(optimizer, lambda batch: batch["x"].sum(), warmup=0)


@pytest.mark.gpu
def test_an_optimizer_that_cannot_be_captured_is_refused():
    wrapped = _lora_model("cuda", torch.bfloat16)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="capturable=True"):
        GraphedStep(optimizer, lambda batch: batch["x"].sum())


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_replayed_steps_train_like_eager_steps(quantized):
    batches = _batches(8, "cuda")
    eager_losses, eager_params, _ = _train(_lora_model("cuda", torch.bfloat16, quantized), batches, False, "cuda")
    graph_losses, graph_params, step = _train(_lora_model("cuda", torch.bfloat16, quantized), batches, True, "cuda")
    assert step.captured_shapes == 1
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=2e-3, atol=0)
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-4)
    assert graph_losses[-1] < graph_losses[0]


@pytest.mark.gpu
def test_eager_forward_between_replays_sees_the_updated_adapter():
    wrapped = _lora_model("cuda", torch.bfloat16)
    batches = _batches(5, "cuda")
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2, capturable=True)
    step = GraphedStep(optimizer, lambda b: causal_lm_loss(wrapped.base_model, b["input_ids"]), warmup=1)
    for batch in batches:
        step(batch)
    with torch.no_grad():
        logits = wrapped(input_ids=batches[0]["input_ids"]).logits
        wrapped.merge()  # the merge computes the update from the fp32 weights, no cache involved
        merged = wrapped(input_ids=batches[0]["input_ids"]).logits
    assert step.captured_shapes == 1
    torch.testing.assert_close(logits.float(), merged.float(), rtol=0.05, atol=0.05)


def _data_parallel_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        wrapped = _lora_model("cpu", torch.float32)
        optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
        step = GraphedStep(optimizer, lambda b: causal_lm_loss(wrapped.base_model, b["input_ids"]),
                           all_reduce=True)
        for batch in _batches(3, "cpu"):
            step({"input_ids": batch["input_ids"][rank:rank + 1]})  # this rank's half of the batch
        save_file({n: p.detach().contiguous() for n, p in wrapped.named_parameters() if p.requires_grad},
                  f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_all_reduce_trains_two_ranks_like_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_data_parallel_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    wrapped = _lora_model("cpu", torch.float32)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
    step = GraphedStep(optimizer, lambda b: causal_lm_loss(wrapped.base_model, b["input_ids"]))
    for batch in _batches(3, "cpu"):
        step(batch)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    expected = {n: p.detach() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(ranks[0]) == set(expected)
    for name, want in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], want, rtol=1e-4, atol=1e-6)


def test_all_reduce_without_a_process_group_is_refused():
    wrapped = _lora_model("cpu", torch.float32)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="process group"):
        GraphedStep(optimizer, lambda batch: batch["x"].sum(), all_reduce=True)
