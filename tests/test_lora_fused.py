"""LoRA's one-kernel inference path: the site's fused forward (CPU) and the Triton kernel (GPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab import LoraConfig
from peftlab.adapters import sites
from peftlab.adapters.lora import LoraWeights

from .conftest import make_llama

ADAPTED_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _has_site_forward(module: torch.nn.Module) -> bool:
    return sites._is_site_forward(module.__dict__.get("forward"))


@pytest.fixture
def counted_fusion(monkeypatch):
    """Makes every LoRA layer fuse on CPU with plain torch math, and counts the calls."""
    calls = []

    def fused(self, module, x):
        calls.append(module)
        a, b = self.lora_A, self.lora_B
        return F.linear(x, module.weight, module.bias) + F.linear(F.linear(x, a), b) * self.scaling

    monkeypatch.setattr(LoraWeights, "fused_forward", fused)
    return calls


def test_fused_forward_replaces_base_plus_update_exactly_once(counted_fusion, token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    with torch.no_grad():
        out = wrapped(**token_batch).logits
        assert len(counted_fusion) == 2 * ADAPTED_PER_LAYER
        wrapped.merge()  # no hooks left: base weights plus the delta
        merged = wrapped(**token_batch).logits
    assert len(counted_fusion) == 2 * ADAPTED_PER_LAYER
    # Had the after-hook also added the term, the fused output would hold it twice.
    torch.testing.assert_close(out, merged, rtol=1e-4, atol=1e-4)


def test_declined_fusion_and_cpu_give_the_hooked_result(token_batch):
    """On CPU the real fused forward declines; outputs equal the merged model's."""
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    q_proj = wrapped.base_model.model.layers[0].self_attn.q_proj
    assert _has_site_forward(q_proj)
    with torch.no_grad():
        out = wrapped(**token_batch).logits
        wrapped.merge()
        merged = wrapped(**token_batch).logits
    torch.testing.assert_close(out, merged, rtol=1e-4, atol=1e-4)


def test_site_forward_follows_liveness_and_leaves_no_trace(token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    layer = wrapped.base_model.model.layers[1]
    adapted = [layer.self_attn.q_proj, layer.mlp.down_proj]
    assert all(_has_site_forward(m) for m in adapted)
    assert not _has_site_forward(layer.input_layernorm)
    with wrapped.disable_adapters():
        assert not any(_has_site_forward(m) for m in adapted)
    assert all(_has_site_forward(m) for m in adapted)
    wrapped.merge()
    assert not any(_has_site_forward(m) for m in adapted)
    wrapped.unmerge()
    clone = copy.deepcopy(wrapped)  # the copy's forwards are bound to the copy's own sites
    clone_q = clone.base_model.model.layers[1].self_attn.q_proj
    assert clone_q.forward.func.__self__ is clone_q.__dict__[sites._ATTR] and clone_q.forward.args[0] is clone_q
    assert sites.clone_without_sites(layer.self_attn.q_proj).__dict__.get("forward") is None
    wrapped.delete_adapter("default")
    assert not any("forward" in m.__dict__ for m in wrapped.modules())


def test_a_forward_replaced_by_someone_else_is_kept(token_batch):
    base = make_llama()
    q_proj = base.model.layers[0].self_attn.q_proj
    theirs = q_proj.forward  # e.g. accelerate's offload wrapper, set on the instance
    q_proj.forward = lambda x: theirs(x)
    wrapped = peftlab.wrap(base, LoraConfig(r=4, init="random"))
    assert not _has_site_forward(q_proj)
    with torch.no_grad():
        out = wrapped(**token_batch).logits
        wrapped.merge()
        torch.testing.assert_close(out, wrapped(**token_batch).logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- GPU
DEVICE = "cuda"


def _rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fuse_down", [True, False])
@pytest.mark.parametrize("m,n,k,r,bias", [(1, 2048, 2048, 16, False), (128, 256, 2048, 16, True),
                                          (300, 520, 1000, 8, True), (4096, 2048, 5632, 16, False),
                                          (77, 5632, 2048, 24, False), (600, 300, 1001, 16, True)])
def test_kernel_matches_fp64(m, n, k, r, bias, fuse_down, dtype):
    from peftlab.quant.kernels import tuning
    from peftlab.quant.kernels.lora_linear import lora_add, lora_linear, lora_transient_merge

    g = torch.Generator(device=DEVICE).manual_seed(m + n + k)
    x = torch.randn(m, k, device=DEVICE, generator=g).to(dtype)
    w = (torch.randn(n, k, device=DEVICE, generator=g) * 0.02).to(dtype)
    a = (torch.randn(r, k, device=DEVICE, generator=g) * 0.02).to(dtype)
    b = (torch.randn(n, r, device=DEVICE, generator=g) * 0.5).to(dtype)
    bvec = (torch.randn(n, device=DEVICE, generator=g) * 0.1).to(dtype) if bias else None
    h = (x.double() @ a.double().t()).to(dtype).double()
    ref = x.double() @ w.double().t() + h @ b.double().t() + (bvec.double() if bias else 0)
    configs = [c for c in tuning.lora_candidates(m) + tuning.lora_candidates(4096) if c["FUSE_DOWN"] == fuse_down]
    configs += [c for row in tuning.LORA_FORWARD.values() for kind, c in row.values()
                if kind == "fused" and c["FUSE_DOWN"] == fuse_down]
    for config in configs:
        out = lora_linear(x, w, bvec, a, b, config)
        assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), config
    if fuse_down:  # through a merged weight made for the call (h is not rounded there)
        exact = x.double() @ (w.double() + b.double() @ a.double()).t() + (bvec.double() if bias else 0)
        for config in tuning.lora_add_candidates():
            out = lora_transient_merge(x, w, bvec, a, b, config)
            assert _rel(out, exact) < (1e-2 if dtype == torch.bfloat16 else 2e-3), config
    if not bias:  # the other Triton path: cuBLAS base and h, the term added in place
        base_out = x @ w.t()
        configs = tuning.lora_add_candidates() + [c for row in tuning.LORA_FORWARD.values()
                                                  for kind, c in row.values() if kind == "add"]
        for config in configs:
            out = lora_add(base_out.clone(), x @ a.t(), b, config)
            assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), config


@pytest.mark.gpu
def test_model_outputs_with_the_fused_kernel_match_separate_gemms_and_hf_peft(monkeypatch, tmp_path, request):
    import peft

    from peftlab.quant.kernels import lora_linear as kernel_module
    from peftlab.quant.kernels import tuning

    def base():
        return make_llama(hidden_size=256, intermediate_size=512).to(DEVICE, torch.bfloat16)

    ours = peftlab.wrap(base(), LoraConfig(r=16, alpha=32, init="random")).eval()
    ours.save(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 128, (2, 40), device=DEVICE)
    request.addfinalizer(tuning.lora_plan.cache_clear)  # after monkeypatch restores the table
    calls = []
    for name in ("lora_linear", "lora_add", "lora_transient_merge"):
        real = getattr(kernel_module, name)
        monkeypatch.setattr(kernel_module, name, lambda *a, name=name, real=real, **kw: calls.append(name) or real(*a, **kw))

    def run_with(table):
        monkeypatch.setattr(tuning, "LORA_FORWARD", table)
        tuning.lora_plan.cache_clear()
        calls.clear()
        with torch.no_grad():
            return ours(input_ids=ids).logits.double()

    def captured_with(table):
        monkeypatch.setattr(tuning, "LORA_FORWARD", table)
        tuning.lora_plan.cache_clear()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ours(input_ids=ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            calls.clear()
            with torch.cuda.graph(graph):
                logits = ours(input_ids=ids).logits
            graph.replay()
        return logits.double()

    add_config = tuning.lora_add_candidates()[0]
    separate = run_with({})
    assert not calls
    fused = run_with({(256, 256): {1: ("fused", tuning.lora_candidates(80)[0])}})
    assert calls == ["lora_linear"] * 2 * ADAPTED_PER_LAYER
    for kind in ("add", "merge"):
        run_with({(256, 256): {1: (kind, add_config)}})
        assert not calls  # eagerly these would cost the host more than they save the GPU
    captured_add = captured_with({(256, 256): {1: ("add", add_config)}})  # ... but inside a CUDA graph they run
    assert calls == ["lora_add"] * 2 * ADAPTED_PER_LAYER
    captured_merge = captured_with({(256, 256): {1: ("merge", add_config)}})
    assert calls == ["lora_transient_merge", "lora_add"] * 2 * ADAPTED_PER_LAYER
    with torch.no_grad():
        reference = theirs(input_ids=ids).logits.double()
        merged_model = copy.deepcopy(ours)
        for weights in merged_model.modules():  # merge the 16-bit A and s·B the inference paths use
            if isinstance(weights, LoraWeights):
                weights.lora_A.copy_(weights.lora_A.to(torch.bfloat16).float())
                weights.lora_B.copy_((weights.lora_B * weights.scaling).to(torch.bfloat16).float() / weights.scaling)
        merged_model.merge()
        merged = merged_model(input_ids=ids).logits.double()
    for ours_out in (separate, fused, captured_add):
        assert _rel(ours_out, reference) < 1e-2
    # A merged weight rounds the update into bf16 once, as merge() does: the merged model's numbers
    # (scaling is 2 here, so s·B / s is exact).
    assert _rel(captured_merge, merged) < 3e-3 and _rel(merged, reference) < 2e-2
    ours.train()
    calls.clear()
    ours(input_ids=ids).logits.float().sum().backward()  # training needs autograd: the Triton paths stay out
    assert not calls
