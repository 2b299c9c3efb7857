"""LOMO/AdaLomo data parallelism: 2 CPU processes (gloo) average gradients inside the hook."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from peftlab.optim import AdaLomo, Lomo, LomoConfigError
from tests.conftest import free_port, make_llama

STEPS, LR = 3, {"Lomo": 0.1, "AdaLomo": 1e-2}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (4, 12), generator=g) for _ in range(STEPS)]  # the combined batch


def _check_ddp_is_refused() -> None:
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # collective: every rank
    try:
        Lomo(ddp, lr=0.1)
    except LomoConfigError as err:
        assert "DistributedDataParallel" in str(err) and "model.module" in str(err), err
    else:
        raise AssertionError("a DDP-wrapped model was accepted")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _check_ddp_is_refused()
        gc.collect()  # the DDP wrapper (reference cycles) lets go of the process group now, not at exit
        for cls in (Lomo, AdaLomo):
            model = make_llama()
            model.train()
            opt = cls(model, lr=LR[cls.__name__])
            norms = []
            for ids in _batches():
                shard = ids[rank * 2:(rank + 1) * 2]  # this rank's half of the combined batch
                opt.backward(model(input_ids=shard, labels=shard).loss)
                norms.append(opt.last_grad_norm)
            tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
            tensors["grad_norms"] = torch.tensor(norms, dtype=torch.float64)
            save_file(tensors, f"{out_dir}/{cls.__name__}-rank{rank}.safetensors")
        dist.barrier()  # neither rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process_training_on_the_combined_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    try:
        _compare_with_single_process(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_with_single_process(tmp_path) -> None:
    for cls in (Lomo, AdaLomo):
        rank0 = load_file(str(tmp_path / f"{cls.__name__}-rank0.safetensors"))
        rank1 = load_file(str(tmp_path / f"{cls.__name__}-rank1.safetensors"))
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{cls.__name__}: ranks disagree on {name}"

        reference = make_llama()
        reference.train()
        if cls is Lomo:  # the plain torch reference: SGD on the combined batch
            sgd = torch.optim.SGD(reference.parameters(), lr=LR["Lomo"])
            norms = []
            for ids in _batches():
                reference(input_ids=ids, labels=ids).loss.backward()
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item())
                sgd.step()
                sgd.zero_grad()
        else:  # AdaLomo on one process, whole batch (its equations are checked in test_lomo.py)
            opt = AdaLomo(reference, lr=LR["AdaLomo"])
            norms = []
            for ids in _batches():
                opt.backward(reference(input_ids=ids, labels=ids).loss)
                norms.append(opt.last_grad_norm)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{cls.__name__} {name}")
        assert rank0["grad_norms"].tolist() == pytest.approx(norms, rel=1e-5)
