"""LOMO / AdaLomo: equality with independent references, resume, precision, and every refusal."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.optim import (
    AdaLomo,
    Lomo,
    LomoConfigError,
    LomoUsageError,
    state_dict_from_safetensors,
    state_dict_to_safetensors,
)
from peftlab.optim.fused_update import stochastic_round
from tests.conftest import make_gpt2, make_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run several times faster on one intra-op thread than on a contended pool."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batches(n: int, seed: int = 0, batch: int = 2, length: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, length), generator=g) for _ in range(n)]


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _train_model(model):
    model.train()
    return model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs (max {(p.float() - q.float()).abs().max().item():.3g})"


def _sgd_reference_step(model, opt, ids, lr, weight_decay, max_norm=None):
    """Plain torch: backward, optional clip_grad_norm_, decoupled decay, torch.optim.SGD."""
    _loss(model, ids).backward()
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 - lr * weight_decay)
    opt.step()
    opt.zero_grad()
    return norm


# ------------------------------------------------------------------ LOMO == SGD


@pytest.mark.parametrize("entry", ["opt.backward", "loss.backward"])
def test_lomo_equals_sgd_with_decoupled_weight_decay(entry):
    lr, wd = 0.1, 0.1
    model = _train_model(make_llama())
    ref = copy.deepcopy(model)
    opt = Lomo(model, lr=lr, weight_decay=wd)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr, foreach=False)
    for ids in _batches(3):
        if entry == "opt.backward":
            opt.backward(_loss(model, ids))
        else:
            _loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
        ref_norm = _sgd_reference_step(ref, sgd, ids, lr, wd)
        assert opt.last_grad_norm == pytest.approx(ref_norm, rel=1e-5)
        _assert_same_weights(model, ref)
    assert all(p.grad is None for p in model.parameters())


def test_tied_embeddings_are_updated_exactly_once_per_step():
    lr = 0.05
    for model in (make_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), make_llama(tie_word_embeddings=True)):
        model = _train_model(model)
        tied = model.get_output_embeddings().weight
        assert tied is model.get_input_embeddings().weight
        ref = copy.deepcopy(model)
        fired = []
        tied.register_post_accumulate_grad_hook(lambda p: fired.append(1))  # runs before the optimizer's
        opt = Lomo(model, lr=lr)
        sgd = torch.optim.SGD(ref.parameters(), lr=lr, foreach=False)
        for ids in _batches(3):
            opt.backward(_loss(model, ids))
            _sgd_reference_step(ref, sgd, ids, lr, 0.0)
        _assert_same_weights(model, ref)
        assert len(fired) == 3 and opt.state[tied]["step"] == 3


def test_non_reentrant_checkpointing_matches_sgd_with_and_without_clipping():
    for max_norm in (None, 0.5):
        model = _train_model(make_llama())
        ref = copy.deepcopy(model)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        opt = Lomo(model, lr=0.1, clip_grad_norm=max_norm)
        sgd = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False)
        for ids in _batches(2):
            opt.backward(_loss(model, ids))
            _sgd_reference_step(ref, sgd, ids, 0.1, 0.0, max_norm=max_norm)
        if max_norm is None:
            _assert_same_weights(model, ref)
        else:
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ clipping: two passes, true norm


def test_clipping_uses_two_backward_passes_and_matches_clip_grad_norm():
    lr, max_norm = 0.1, 0.5
    model = _train_model(make_llama())
    ref = copy.deepcopy(model)
    passes = []
    first = next(model.parameters())
    first.register_post_accumulate_grad_hook(lambda p: passes.append(1))
    opt = Lomo(model, lr=lr, clip_grad_norm=max_norm)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr, foreach=False)
    for ids in _batches(3):
        opt.backward(_loss(model, ids))
        ref_norm = _sgd_reference_step(ref, sgd, ids, lr, 0.0, max_norm=max_norm)
        assert ref_norm > max_norm  # clipping really happened
        assert opt.last_grad_norm == pytest.approx(ref_norm, rel=1e-5)
    assert len(passes) == 6  # two backward passes per step
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)

    passes.clear()
    plain = _train_model(make_llama())
    next(plain.parameters()).register_post_accumulate_grad_hook(lambda p: passes.append(1))
    Lomo(plain, lr=lr).backward(_loss(plain, _batches(1)[0]))
    assert len(passes) == 1  # without clipping: one backward pass


def test_lr_scheduler_changes_apply_from_the_next_backward():
    model = _train_model(make_llama())
    ref = copy.deepcopy(model)
    opt = Lomo(model, lr=0.2)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.2, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0 / (1 + s))
    for ids in _batches(3):
        opt.backward(_loss(model, ids))
        before = [p.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # step() is a no-op
        sched.step()
        _sgd_reference_step(ref, sgd, ids, sgd.param_groups[0]["lr"], 0.0)
        ref_sched.step()
        _assert_same_weights(model, ref)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / 4)


# ------------------------------------------------------------------ AdaLomo == the paper's equations


def _adalomo_paper_step(params, state, t, lr, eps1, eps2, d, decay_rate, weight_decay):
    """AdaLomo (Lv et al. 2024, Alg. 1) for one step, in float64, written from the paper.

    Returns, per parameter, whether the grouped update normalisation was active.
    """
    beta = 1.0 - t ** decay_rate
    normalised = []
    for name, (theta, grad) in params.items():
        g = grad.double()
        th = theta.detach().double()
        if g.dim() == 2:
            n, m = g.shape
            sq = g * g + eps1 * torch.ones(n, m, dtype=torch.float64)
            R = state.setdefault(name + ".R", torch.zeros(n, dtype=torch.float64))
            C = state.setdefault(name + ".C", torch.zeros(m, dtype=torch.float64))
            R.mul_(beta).add_((1 - beta) * (sq @ torch.ones(m, dtype=torch.float64)))
            C.mul_(beta).add_((1 - beta) * (torch.ones(n, dtype=torch.float64) @ sq))
            V = torch.outer(R, C) / (torch.ones(n, dtype=torch.float64) @ R)
        else:
            v = state.setdefault(name + ".v", torch.zeros_like(g))
            v.mul_(beta).add_((1 - beta) * (g * g + eps1))
            V = v
        U = g / V.sqrt()
        rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
        U_hat = U / max(1.0, (rms(U) / d).item())
        normalised.append((rms(U) / d).item() > 1.0)
        eta = lr * max(eps2, rms(th).item())
        with torch.no_grad():
            theta.copy_((1 - eta * weight_decay) * th - eta * U_hat)
    return normalised


@pytest.mark.parametrize("weight_decay,clip_threshold", [(0.0, 1.0), (0.05, 0.5)])
def test_adalomo_matches_the_paper_reference(weight_decay, clip_threshold):
    lr, eps, decay_rate = 1e-2, (1e-30, 1e-3), -0.8
    model = _train_model(make_llama())
    ref = copy.deepcopy(model)
    opt = AdaLomo(model, lr=lr, weight_decay=weight_decay, eps=eps, clip_threshold=clip_threshold,
                  decay_rate=decay_rate)
    state, any_normalised = {}, False
    for t, ids in enumerate(_batches(5), start=1):
        opt.backward(_loss(model, ids))
        _loss(ref, ids).backward()
        params = {n: (p, p.grad) for n, p in ref.named_parameters()}
        any_normalised |= any(_adalomo_paper_step(params, state, t, lr, *eps, clip_threshold, decay_rate,
                                                  weight_decay))
        ref.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-7)
    assert any_normalised  # the grouped update normalisation was exercised
    row = opt.state[model.model.layers[0].mlp.up_proj.weight]
    torch.testing.assert_close(row["exp_avg_sq_row"].double() * 64,
                               state["model.layers.0.mlp.up_proj.weight.R"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("cls,lr", [(Lomo, 0.1), (AdaLomo, 3e-2)])
def test_loss_falls_on_a_tiny_llama(cls, lr):
    model = _train_model(make_llama())
    ids = _batches(1)[0]
    opt = cls(model, lr=lr)
    losses = []
    for _ in range(20):
        loss = _loss(model, ids)
        losses.append(loss.item())
        opt.backward(loss)
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------ state: resume, placement


def _save_and_reload_state(opt, tmp_path):
    tensors, metadata = state_dict_to_safetensors(opt.state_dict())
    path = tmp_path / "optimizer.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return state_dict_from_safetensors(load_file(str(path)), metadata)


@pytest.mark.parametrize("cls,dtype,kwargs", [
    (AdaLomo, torch.bfloat16, dict(lr=1e-2, weight_decay=0.01)),
    (Lomo, torch.float16, dict(lr=1e-2, clip_grad_norm=1.0, init_loss_scale=2.0 ** 20)),
])
def test_resume_continues_exactly(cls, dtype, kwargs, tmp_path):
    batches = _batches(6)
    full = _train_model(make_llama(dtype=dtype))
    opt = cls(full, **kwargs)
    for ids in batches:
        opt.backward(_loss(full, ids))

    first = _train_model(make_llama(dtype=dtype))
    opt = cls(first, **kwargs)
    for ids in batches[:3]:
        opt.backward(_loss(first, ids))
    state = _save_and_reload_state(opt, tmp_path)
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    if cls is AdaLomo:
        assert any("exp_avg_sq_row" in s for s in state["state"].values())
    else:
        assert state["loss_scaler"]["scale"] == 2.0 ** 18 and state["skipped_steps"] == 2

    resumed = _train_model(make_llama(dtype=dtype, seed=123))
    resumed.load_state_dict(weights)
    opt2 = cls(resumed, **kwargs)
    opt2.load_state_dict(state)
    for ids in batches[3:]:
        opt2.backward(_loss(resumed, ids))
    _assert_same_weights(resumed, full)


def test_state_only_for_trainable_parameters_on_their_device():
    model = _train_model(make_llama())
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = AdaLomo(model, lr=1e-3)
    opt.backward(_loss(model, _batches(1)[0]))
    assert model.model.embed_tokens.weight not in opt.state
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(map(id, opt.state)) == set(map(id, trainable))
    for p, st in opt.state.items():
        assert all(v.device == p.device and v.dtype == torch.float32 for v in st.values() if torch.is_tensor(v))
    other = _train_model(make_llama())
    lomo = Lomo(other, lr=1e-3)
    lomo.backward(_loss(other, _batches(1)[0]))
    assert not any(torch.is_tensor(v) for st in lomo.state.values() for v in st.values())


def test_remove_hooks_and_context_manager():
    model = _train_model(make_llama())
    with Lomo(model, lr=0.1) as opt:
        opt.backward(_loss(model, _batches(1)[0]))
    before = [p.clone() for p in model.parameters()]
    _loss(model, _batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(LomoUsageError, match="hooks were removed"):
        opt.backward(_loss(model, _batches(1)[0]))
    model.zero_grad(set_to_none=True)
    Lomo(model, lr=0.1)  # the parameters are free again


# ------------------------------------------------------------------ fp16 overflow, bf16 rounding


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_fp16_overflow_in_the_last_gradient_skips_every_update(cls):
    model = _train_model(make_llama(dtype=torch.float16))
    order = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n))
             for n, p in model.named_parameters()]
    _loss(model, _batches(1)[0]).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    last = dict(model.named_parameters())[order[-1]]  # the parameter whose gradient arrives last

    opt = cls(model, lr=1e-2)
    assert opt.loss_scale == 2.0 ** 16
    ids = _batches(2)
    opt.backward(_loss(model, ids[0]))
    snapshot = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    poison = last.register_hook(lambda g: g * float("inf"))
    opt.backward(_loss(model, ids[1]))
    poison.remove()
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.loss_scale == 2.0 ** 15
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{k} moved on a skipped step"
    state_after = opt.state_dict()
    assert state_after["state"].keys() == state_before["state"].keys()
    for index, entry in state_after["state"].items():
        for k, v in entry.items():
            before = state_before["state"][index][k]
            assert torch.equal(v, before) if torch.is_tensor(v) else v == before, (index, k)
    opt.backward(_loss(model, ids[1]))
    assert not opt.last_step_skipped and math.isfinite(opt.last_grad_norm)
    assert not torch.equal(model.lm_head.weight, snapshot["lm_head.weight"])


def _movement(model, start):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()]) - start


def test_bf16_stochastic_rounding_keeps_small_updates():
    """bf16 AdaLomo at lr 5e-4 for 100 steps keeps >= 95% of the fp32 run's movement.

    Intended movement = the same optimizer on an fp32 copy of the same initial weights and
    batches. Retention = projection of the bf16 movement onto it: <d_bf16, d_fp32> / |d_fp32|².
    """
    batches = _batches(10, seed=7, length=16)
    base = make_llama().to(torch.bfloat16)
    start = torch.cat([p.detach().double().flatten() for p in base.parameters()])

    def run(dtype, stochastic_rounding, seed=0):
        model = _train_model(copy.deepcopy(base).to(dtype))
        opt = AdaLomo(model, lr=5e-4, stochastic_rounding=stochastic_rounding, seed=seed)
        for step in range(100):
            opt.backward(_loss(model, batches[step % 10]))
        return model

    intended = _movement(run(torch.float32, True), start)
    rounded = run(torch.bfloat16, True)
    kept = (_movement(rounded, start) @ intended / (intended @ intended)).item()
    kept_nearest = (_movement(run(torch.bfloat16, False), start) @ intended / (intended @ intended)).item()
    print(f"bf16 retention of fp32 movement: stochastic {kept:.1%}, round-to-nearest {kept_nearest:.1%}")
    assert kept >= 0.95, kept
    assert kept_nearest < 0.5, kept_nearest  # the measure does see lost updates


def test_stochastic_rounding_is_unbiased_and_seeded():
    gen = torch.Generator()
    for dtype, lo, hi in [(torch.bfloat16, 1.0, 1.0 + 2 ** -7), (torch.float16, -1.0, -(1.0 + 2 ** -10))]:
        x = torch.full((200_000,), lo + 0.3 * (hi - lo))
        y = stochastic_round(x.clone(), dtype, gen.manual_seed(1))
        assert set(y.float().unique().tolist()) == {lo, hi}
        assert y.double().mean().item() == pytest.approx(x[0].item(), abs=4e-3 * abs(hi - lo) + 1e-9)
        assert torch.equal(y, stochastic_round(x.clone(), dtype, gen.manual_seed(1)))
        assert not torch.equal(y, stochastic_round(x.clone(), dtype, gen.manual_seed(2)))


def check_triton_update_matches_torch_path(device: str) -> None:
    """The Triton kernels agree with the torch path (within one 16-bit ulp); rounding is unbiased."""
    from peftlab.optim import fused_update as fu

    g = torch.Generator().manual_seed(0)
    names = ("lr", "weight_decay", "grad_scale", "lr_mult", "grad_mult", "row", "col")
    for dtype in (torch.bfloat16, torch.float16):
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        for shape, factored in (((9, 70), True), ((300,), False), ((9, 70), False)):
            p = torch.randn(shape, generator=g).to(dtype).to(device)
            grad = torch.randn(shape, generator=g).to(dtype).to(device)
            kw = dict(lr=0.01, weight_decay=0.1, grad_scale=0.5)
            if factored:
                kw.update(row=torch.rand(shape[0], generator=g) + 0.5, col=torch.rand(shape[1], generator=g) + 0.5,
                          lr_mult=torch.tensor(0.3), grad_mult=torch.tensor(0.7))
            elif len(shape) == 1:
                kw.update(row=torch.rand(shape[0], generator=g) + 0.5)
            args = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in ((k, kw.get(k)) for k in names)}
            a, b = p.clone(), p.clone()
            fu._apply_torch(a, grad, stochastic_rounding=False, seed=3, **args)
            fu._apply_triton(b, grad, stochastic_rounding=False, seed=3, **args)
            assert ((a.float() - b.float()).abs() <= a.float().abs() * ulp + 1e-7).all(), (dtype, shape)
        # stochastic rounding: reproducible, only the two neighbours of the exact value, unbiased
        reps = 128
        exact = (p.float() * (1 - 0.01 * 0.1) - 0.01 * 0.5 * grad.float()).flatten().repeat(reps)
        many, grads = p.flatten().repeat(reps), grad.flatten().repeat(reps)
        again = many.clone()
        for target in (many, again):
            fu._apply_triton(target, grads, lr=0.01, weight_decay=0.1, grad_scale=0.5, lr_mult=None,
                             grad_mult=None, row=None, col=None, stochastic_rounding=True, seed=5)
        assert torch.equal(many, again)
        assert ((many.float() - exact).abs() <= exact.abs() * ulp + 1e-7).all(), dtype
        mean = many.double().view(reps, -1).mean(0)
        err = (mean - exact[: p.numel()].double()).abs().mean() / exact.double().abs().mean()
        assert err < 2e-3, (dtype, float(err))
        # the kernel's in-pass gradient norm: the squared norm of the raw (unscaled) gradient, accumulated
        sink = torch.full((), 2.0, device=device)
        fu._apply_triton(p.clone(), grad, lr=0.01, weight_decay=0.0, grad_scale=0.5, lr_mult=None, grad_mult=None,
                         row=None, col=None, stochastic_rounding=True, seed=5, sq_out=sink)
        expected = 2.0 + grad.double().square().sum().item()
        assert abs(sink.item() - expected) <= 1e-5 * expected, (dtype, sink.item(), expected)


@pytest.mark.parametrize("check", ["check_triton_update_matches_torch_path", "check_batched_update_matches_one_by_one",
                                   "check_batched_adalomo_matches_one_by_one"])
def test_update_kernels_in_the_triton_interpreter(check):
    pytest.importorskip("triton")
    script = f"from tests.test_lomo import {check} as c; c('cpu'); print('ok')"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def check_batched_update_matches_one_by_one(device: str, dtypes=(torch.float16,)) -> None:
    """One batched launch over several tensors gives the same bits as one launch per tensor."""
    from peftlab.optim import fused_update as fu

    g = torch.Generator().manual_seed(1)
    for dtype in dtypes:
        shapes = [(5000,), (3, 7), (64, 65), (1,)]
        params = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
        grads = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
        seeds = [11, 2 ** 31 + 5, 0, 7]
        one_by_one = [p.clone() for p in params]
        single_sq = torch.zeros((), device=device)
        for p, grad, seed in zip(one_by_one, grads, seeds):
            fu._apply_triton(p, grad, 0.05, 0.1, 0.5, None, None, None, None, True, seed & 0x7FFFFFFF, single_sq)
        batched_sq = torch.zeros((), device=device)
        fu.apply_updates_(params, grads, seeds, lr=0.05, weight_decay=0.1, grad_scale=0.5, sq_out=batched_sq)
        for p, q in zip(params, one_by_one):
            assert torch.equal(p, q), dtype
        expected = sum(grad.double().square().sum().item() for grad in grads)
        assert abs(batched_sq.item() - expected) <= 1e-5 * expected


def check_batched_adalomo_matches_one_by_one(device: str, dtypes=(torch.float16,), rounding: bool = False) -> None:
    """Batched AdaLomo kernels against the one-by-one path: moments to fp32 rounding, weights to one ulp."""
    from peftlab.optim.batched_adalomo import adalomo_updates_

    g = torch.Generator().manual_seed(2)
    for dtype in dtypes:
        shapes = [(37, 300), (3, 4, 5), (700,), (1,)]  # ragged blocks, a 3-D weight, vectors
        params = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
        reference = [p.clone() for p in params]
        opt = AdaLomo(reference, lr=0.05, weight_decay=0.1, stochastic_rounding=rounding, bucket_mb=0)
        group = opt.param_groups[0]
        states = [{} for _ in params]
        for step in (1, 2):
            grads = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
            ref_sq, sq = torch.zeros((), device=device), torch.zeros((), device=device)
            for i, (p, grad) in enumerate(zip(reference, grads)):
                ref_sq += opt._update(p, grad, group, opt.state[p], 0.5, i, None)
            seeds = [opt._seed_for(i, step) for i in range(len(params))]
            adalomo_updates_(params, grads, states, seeds, [1.0 - step ** group["decay_rate"]] * len(params),
                             lr=0.05, weight_decay=0.1, eps=group["eps"], clip_threshold=group["clip_threshold"],
                             grad_scale=0.5, stochastic_rounding=rounding, sq_out=sq)
            assert torch.allclose(sq, ref_sq, rtol=1e-5)
            for p, ref, state in zip(params, reference, states):
                for key, value in opt.state[ref].items():
                    if torch.is_tensor(value):
                        assert torch.allclose(state[key], value, rtol=1e-5, atol=0), (key, p.shape)
                ulp = (ref.float().abs() * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)).clamp_min(1e-6)
                assert ((p.float() - ref.float()).abs() <= ulp * 1.01).all(), (dtype, p.shape)
                assert (p == ref).float().mean() > 0.97, (dtype, p.shape)


@pytest.mark.gpu
def test_cuda_batched_adalomo_matches_one_by_one():
    check_batched_adalomo_matches_one_by_one("cuda", (torch.bfloat16, torch.float16), rounding=True)


@pytest.mark.gpu
def test_cuda_batched_update_matches_one_by_one():
    check_batched_update_matches_one_by_one("cuda", (torch.bfloat16, torch.float16))


@pytest.mark.gpu
def test_cuda_lomo_buckets_give_the_same_weights_as_per_parameter_updates():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64)).to("cuda", torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for bucket_mb in (0.0, 0.05, 64.0):  # per parameter, several small buckets, one bucket
        model = copy.deepcopy(base)
        opt = Lomo(model, lr=0.1, weight_decay=0.01, bucket_mb=bucket_mb)
        norms = []
        for _ in range(3):
            opt.backward(model(x).float().square().mean())
            norms.append(opt.last_grad_norm)
        results.append(([p.detach().clone() for p in model.parameters()], norms))
    for weights, norms in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][0], weights))
        assert norms == pytest.approx(results[0][1], rel=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(results[0][0], base.parameters()))


@pytest.mark.gpu
def test_cuda_triton_update_matches_torch_path():
    check_triton_update_matches_torch_path("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cls,lr", [(Lomo, 0.5), (AdaLomo, 3e-2)])
def test_cuda_bf16_updates_never_synchronise_and_learn(cls, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to("cuda", torch.bfloat16)
    x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16) * 0.1
    opt = cls(model, lr=lr)
    losses = []
    for _ in range(30):
        loss = (model(x).float() - target.float()).pow(2).mean()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync in the hooks raises
        try:
            opt.backward(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert math.isfinite(opt.last_grad_norm)


# ------------------------------------------------------------------ refusals


def test_gradient_accumulation_argument_is_refused():
    with pytest.raises(LomoConfigError, match="gradient_accumulation_steps=4"):
        Lomo(make_llama(), lr=1e-3, gradient_accumulation_steps=4)


def test_gradient_accumulation_in_the_loop_is_detected_before_updating():
    model = _train_model(make_llama())
    opt = Lomo(model, lr=0.1)
    ids = _batches(3)
    opt.backward(_loss(model, ids[0]))
    opt.step()
    _loss(model, ids[1]).backward()
    after_one = [p.clone() for p in model.parameters()]
    with pytest.raises(LomoUsageError, match="gradient accumulation"):
        _loss(model, ids[2]).backward()  # a second backward before step()
    assert all(torch.equal(a, b) for a, b in zip(after_one, model.parameters()))

    fresh = _train_model(make_llama())
    opt = Lomo(fresh, lr=0.1)
    _loss(fresh, ids[0]).backward()
    _loss(fresh, ids[1]).backward()
    with pytest.raises(LomoUsageError, match="gradient accumulation"):
        opt.step()


def test_reentrant_checkpointing_is_refused():
    model = _train_model(make_llama())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    refused = r"module 'model' uses reentrant gradient checkpointing \(use_reentrant=True\)"
    with pytest.raises(LomoConfigError, match=refused):
        Lomo(model, lr=1e-3)

    late = _train_model(make_llama())
    opt = AdaLomo(late, lr=1e-3)
    late.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(LomoConfigError, match="reentrant"):
        opt.backward(_loss(late, _batches(1)[0]))


def test_torch_reentrant_checkpoint_is_detected_at_runtime():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.c(checkpoint(self.b, self.a(x), use_reentrant=True)).sum()

    net = Net()
    opt = Lomo(net, lr=0.1)
    with pytest.raises(LomoUsageError, match="reentrant gradient checkpointing"):
        net(torch.randn(3, 4)).backward()
    assert opt._graph_task is None


def test_plain_backward_is_refused_when_two_passes_are_needed():
    model = _train_model(make_llama())
    Lomo(model, lr=0.1, clip_grad_norm=1.0)
    with pytest.raises(LomoUsageError, match=r"clip_grad_norm.*opt\.backward\(loss\)"):
        _loss(model, _batches(1)[0]).backward()
    half = _train_model(make_llama(dtype=torch.float16))
    Lomo(half, lr=0.1)
    with pytest.raises(LomoUsageError, match=r"fp16 loss scaling.*opt\.backward\(loss\)"):
        _loss(half, _batches(1)[0]).backward()


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), r"param_groups\[0\]: lr must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(clip_grad_norm=0.0), "clip_grad_norm must be a positive number"),
    (dict(loss_scaling="static"), "loss_scaling must be 'auto', 'dynamic' or 'none'"),
    (dict(eps=(1e-30,)), "eps must be two numbers"),
    (dict(clip_threshold=0.0), "clip_threshold must be > 0"),
    (dict(decay_rate=0.8), "decay_rate must be < 0"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(LomoConfigError, match=match):
        AdaLomo(make_llama(), **kwargs)


def test_other_refusals_name_the_problem(tmp_path):
    with pytest.raises(LomoConfigError, match="Lomo: bucket_mb must be >= 0, got -1"):
        Lomo(make_llama(), bucket_mb=-1)
    frozen = make_llama().requires_grad_(False)
    with pytest.raises(LomoConfigError, match="no trainable parameters"):
        Lomo(frozen)

    model = make_llama()
    Lomo(model)
    with pytest.raises(LomoConfigError, match="'model.embed_tokens.weight' is already driven by another Lomo"):
        AdaLomo(model)

    lomo = Lomo(make_llama())
    with pytest.raises(LomoConfigError, match="expected a 'peftlab.lomo' state of a AdaLomo"):
        AdaLomo(make_llama()).load_state_dict(lomo.state_dict())
    small = Lomo(make_llama(num_hidden_layers=1))
    with pytest.raises(LomoConfigError, match=r"param_groups\[0\] has \d+ parameters in the state but \d+ here"):
        small.load_state_dict(lomo.state_dict())
    with pytest.raises(LomoConfigError, match="no 'lomo' metadata"):
        state_dict_from_safetensors({}, {})

    emb = nn.Embedding(10, 4, sparse=True)
    opt = Lomo([("emb.weight", emb.weight)], lr=0.1)
    with pytest.raises(LomoUsageError, match="'emb.weight' got a sparse gradient"):
        emb(torch.tensor([1, 2])).sum().backward()
    assert opt._graph_task is None
