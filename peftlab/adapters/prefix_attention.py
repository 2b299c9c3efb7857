"""How prefix key/value vectors enter a model's self-attention layers.

Mechanism. A forward pre-hook on every self-attention module replaces the ``past_key_values`` it
receives by a stand-in (:class:`PrefixedCache`) whose ``update(k, v, layer)`` lets the real cache,
if any, store and return the real tokens' keys/values as usual and then returns ``[prefix; real]``.
The same hook adds one always-visible column per prefix vector in front of the attention mask.
The real cache never holds the prefix, so every length transformers derives from it (position ids,
mask sizes, ``generate()``'s bookkeeping) counts real tokens only:

* real tokens keep positions ``0..n-1`` -- the prefix is not a position;
* ``generate()`` needs nothing special: each step attends to ``[prefix; cached; new]`` and the cache
  grows with real tokens only; a cache the user passes in mid-generation works unchanged;
* the prefix is recomputed from the adapter's parameters inside each attention call, so gradients
  reach it, and an activation-checkpointed layer recomputes exactly the ops it ran the first time.

HF PEFT instead seeds a fresh cache with the prefix for each forward. transformers 5 derives
positions and mask sizes from the cache length, so there real tokens sit at positions
``P..P+n-1``, every 2D mask must be widened by hand, and a cache passed to ``forward`` is replaced.
The price of our way is one concatenation of the layer's keys/values per call (a ``DynamicCache``
already copies them once per step).

Only what we can vouch for is accepted: ``eager`` and ``sdpa`` attention, caches made of
full-attention ``DynamicLayer``/``StaticLayer`` layers, decoder-only or encoder-only models without
sliding windows, ALiBi or relative position biases. Anything else raises
:class:`PrefixUnsupportedError` naming it, never a silently wrong result.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from ..errors import TargetError

try:
    from transformers.cache_utils import DynamicLayer, StaticLayer
except ImportError:  # transformers < 4.56 has no cache layers; check_model refuses it
    DynamicLayer = StaticLayer = None

if TYPE_CHECKING:  # pragma: no cover
    from .prefix import PrefixTuning

MIN_TRANSFORMERS = "5.0"  # attention modules fetch K/V via past_key_values.update(); masks from masking_utils
SUPPORTED_ATTENTION = ("eager", "sdpa")
_SUPPORTED_LAYERS = (DynamicLayer, StaticLayer)
_ABSOLUTE_POSITIONS = (None, "absolute", "rope", "rotary")
_SITE = "_peftlab_prefix_site"
_CACHE_PARAMETERS = ("past_key_values", "layer_past")


class PrefixUnsupportedError(TargetError):
    """The model, its attention implementation or the cache it was given cannot carry a prefix."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of the keys/values one prefix vector adds: per layer, ``kv_heads x head_dim`` for K and for V."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def layer_width(self) -> int:
        """Numbers per prefix position and layer (keys and values)."""
        return 2 * self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Numbers per prefix position over all layers (HF PEFT's ``num_layers * 2 * token_dim``)."""
        return self.num_layers * self.layer_width

    def split(self, layer_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[P, 2*kv_heads*head_dim]`` (K then V, heads outer) -> keys, values ``[kv_heads, P, head_dim]``."""
        kv = layer_rows.view(layer_rows.shape[0], 2, self.kv_heads, self.head_dim)
        return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


def text_config(model: nn.Module) -> Any:
    """The config describing the model's transformer stack."""
    config = getattr(model, "config", None)
    if config is None:
        raise PrefixUnsupportedError(f"{type(model).__name__} has no transformers config; prefix tuning reads the "
                                     "number of layers and key/value heads from it.")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_layout(model: nn.Module) -> KVLayout:
    """Layers, key/value heads and head size from the config (``head_dim`` need not be hidden/heads)."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVLayout(config.num_hidden_layers, kv_heads, head_dim)


def check_attention_implementation(implementation: str | None, where: str) -> None:
    """Refuse attention kernels whose masks we do not widen (flash, flex, paged...)."""
    if implementation is not None and implementation not in SUPPORTED_ATTENTION:
        raise PrefixUnsupportedError(
            f"{where} uses attention implementation {implementation!r}; prefix tuning supports "
            f"{' and '.join(repr(a) for a in SUPPORTED_ATTENTION)} (load the model with attn_implementation='sdpa')."
        )


def transformers_version() -> str:
    """The installed transformers version."""
    return transformers.__version__


def check_model(model: nn.Module) -> None:
    """Refuse architectures whose attention a plain key/value prefix cannot extend faithfully."""
    name = type(model).__name__
    installed = transformers_version()
    if Version(installed) < Version(MIN_TRANSFORMERS):
        raise PrefixUnsupportedError(f"prefix tuning needs transformers >= {MIN_TRANSFORMERS}; {installed} is "
                                     "installed.")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise PrefixUnsupportedError(f"{name} is an encoder-decoder model; prefix tuning supports decoder-only "
                                     "language models and encoders.")
    config = text_config(model)
    if getattr(config, "add_cross_attention", False):
        raise PrefixUnsupportedError(f"{name} has cross-attention layers (config.add_cross_attention=True), which "
                                     "prefix tuning does not support.")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        raise PrefixUnsupportedError(
            f"{name} uses sliding-window attention (config.sliding_window={window}); prefix tuning supports "
            "full attention only (set sliding_window=None if your sequences fit the window).")
    other_types = sorted(set(getattr(config, "layer_types", None) or ()) - {"full_attention"})
    if other_types:
        raise PrefixUnsupportedError(f"{name} has {', '.join(other_types)} layers (config.layer_types); prefix "
                                     "tuning supports full-attention layers only.")
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") in ("bloom", "mpt"):
        raise PrefixUnsupportedError(f"{name} uses ALiBi position biases, which depend on key positions a prefix "
                                     "does not have.")
    positions = getattr(config, "position_embedding_type", None)
    if positions not in _ABSOLUTE_POSITIONS:
        raise PrefixUnsupportedError(f"{name} uses {positions!r} position embeddings (relative to key positions, "
                                     "which a prefix does not have); prefix tuning supports absolute and rotary ones.")
    check_attention_implementation(getattr(config, "_attn_implementation", None), f"{name} (config._attn_implementation)")


def _forward_parameters(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _cache_parameter(params: list[str]) -> str | None:
    """The forward parameter through which the module receives its cache (GPT-NeoX and Falcon say ``layer_past``)."""
    return next((name for name in _CACHE_PARAMETERS if name in params), None)


def _is_self_attention(name: str, module: nn.Module) -> bool:
    params = _forward_parameters(module)
    return (isinstance(getattr(module, "layer_idx", None), int) and "attention_mask" in params
            and _cache_parameter(params) is not None and not getattr(module, "is_cross_attention", False)
            and "cross" not in name.rsplit(".", 1)[-1].lower() and "cross" not in type(module).__name__.lower())


def attention_modules(model: nn.Module, layout: KVLayout) -> list[str]:
    """Paths of the self-attention modules, one per layer, in layer order.

    A self-attention module has an integer ``layer_idx`` and a forward taking ``attention_mask`` and
    ``past_key_values`` (or ``layer_past``); of nested candidates the innermost talks to the cache.
    """
    candidates = {name: m for name, m in model.named_modules() if name and _is_self_attention(name, m)}
    innermost = [n for n in candidates if not any(o.startswith(n + ".") for o in candidates)]
    by_layer: dict[int, list[str]] = {}
    for name in innermost:
        by_layer.setdefault(candidates[name].layer_idx, []).append(name)
    expected = list(range(layout.num_layers))
    if sorted(by_layer) != expected or any(len(v) != 1 for v in by_layer.values()):
        found = ", ".join(f"{n} (layer {candidates[n].layer_idx})" for n in innermost) or "none"
        raise PrefixUnsupportedError(
            f"{type(model).__name__}: expected one self-attention module per layer 0..{layout.num_layers - 1} "
            f"(a module with layer_idx whose forward takes attention_mask and past_key_values or layer_past); "
            f"found: {found}.")
    return [by_layer[i][0] for i in expected]


def check_cache(cache: Any, layer_idx: int, where: str) -> None:
    """Accept no cache, or a transformers cache whose layer ``layer_idx`` is a full-attention layer we support."""
    if cache is None:
        return
    if not isinstance(cache, Cache) or isinstance(cache, EncoderDecoderCache):
        raise PrefixUnsupportedError(
            f"{where} received past_key_values of type {type(cache).__name__}; prefix tuning supports "
            "DynamicCache and StaticCache (caches of full-attention DynamicLayer/StaticLayer layers).")
    if layer_idx < len(cache.layers):
        layer_cls = type(cache.layers[layer_idx])
    else:
        layer_cls = cache.layer_class_to_replicate
    if layer_cls not in _SUPPORTED_LAYERS:
        layer_name = getattr(layer_cls, "__name__", str(layer_cls))
        raise PrefixUnsupportedError(
            f"{where}: {type(cache).__name__} gives layer {layer_idx} a {layer_name}; prefix tuning supports "
            "DynamicCache and StaticCache (caches of full-attention DynamicLayer/StaticLayer layers).")


def widen_mask(mask: Any, prefix_length: int, q_len: int, kv_len: int, causal: bool, implementation: str | None,
               device: torch.device, where: str) -> torch.Tensor | None:
    """The attention mask with ``prefix_length`` always-visible key columns in front.

    ``None`` means "no masking" to eager attention and "causal, upper-left aligned" to sdpa when the
    module is causal and there is more than one query; with a prefix the latter needs a real mask.
    """
    if mask is None:
        if implementation != "sdpa" or not causal or q_len <= 1:
            return None
        real = torch.arange(q_len, device=device)[:, None] >= torch.arange(kv_len, device=device)[None, :]
        visible = torch.ones(q_len, prefix_length, dtype=torch.bool, device=device)
        return torch.cat((visible, real), dim=-1)[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        shape = f"shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else f"type {type(mask).__name__}"
        raise PrefixUnsupportedError(f"{where} received an attention mask of {shape}; prefix tuning extends 4D "
                                     "masks (as transformers builds them for eager and sdpa attention).")
    if mask.dtype == torch.bool:
        visible = mask.new_ones((*mask.shape[:-1], prefix_length))
    elif mask.is_floating_point():
        visible = mask.new_zeros((*mask.shape[:-1], prefix_length))  # additive mask: 0 = attend
    else:
        raise PrefixUnsupportedError(f"{where} received an attention mask of dtype {mask.dtype}; prefix tuning "
                                     "extends boolean and additive floating-point masks.")
    return torch.cat((visible, mask), dim=-1)


class PrefixedCache:
    """Stands in for one attention call's ``past_key_values``: ``update`` returns ``[prefix; real]``.

    Everything else is looked up on the real cache, which alone stores the real tokens.
    """

    def __init__(self, inner: Cache | None, keys: torch.Tensor, values: torch.Tensor, mask_width: int | None,
                 where: str):
        self.inner = inner
        self.keys, self.values = keys, values  # [kv_heads, P, head_dim]
        self.mask_width = mask_width
        self.where = where
        self.calls = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the real keys/values in the real cache (if any) and return them behind the prefix."""
        self.calls += 1
        expected = (self.keys.shape[0], self.keys.shape[2])
        for what, states in (("keys", key_states), ("values", value_states)):
            if states.dim() != 4 or (states.shape[1], states.shape[3]) != expected:
                raise PrefixUnsupportedError(
                    f"{self.where} produced {what} of shape {list(states.shape)}, but the prefix was made for "
                    f"[batch, {expected[0]} key/value heads, tokens, head_dim {expected[1]}] (from the model config).")
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        total = self.keys.shape[1] + key_states.shape[2]
        if self.mask_width is not None and self.mask_width != total:
            raise PrefixUnsupportedError(f"{self.where}: the attention mask covers {self.mask_width} keys but the "
                                         f"layer attends to {total} (prefix + real); the mask does not fit the cache.")
        batch = key_states.shape[0]
        keys = self.keys.to(key_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        values = self.values.to(value_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat((keys, key_states), dim=2), torch.cat((values, value_states), dim=2)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{self.where}: the attention module asked for past_key_values.{name}, but no cache "
                                 "was passed")
        return getattr(inner, name)


class PrefixSite:
    """The hooks on one self-attention module, shared by every prefix adapter attached there."""

    def __init__(self, module: nn.Module, path: str):
        self.path = path
        self.layer_idx: int = module.layer_idx
        self.adapters: list[PrefixTuning] = []
        params = _forward_parameters(module)
        self._hidden_name, self._cache_name = params[0], _cache_parameter(params)
        self._positions = {name: params.index(name) for name in (params[0], "attention_mask", self._cache_name)}
        self._pending: dict[int, PrefixedCache] = {}  # per thread: a model may serve several threads at once
        self._pre = module.register_forward_pre_hook(self._before, with_kwargs=True)
        self._post = module.register_forward_hook(self._after)

    @property
    def where(self) -> str:
        return f"attention module '{self.path}'"

    def _get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self._positions[name]
        return args[position] if position < len(args) else None

    def _set(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        position = self._positions[name]
        if name not in kwargs and position < len(args):
            return args[:position] + (value,) + args[position + 1:], kwargs
        return args, {**kwargs, name: value}

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        self._pending.pop(threading.get_ident(), None)  # left over if the previous forward raised
        live = [adapter for adapter in self.adapters if adapter.live]
        if not live:
            return None
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        check_attention_implementation(implementation, self.where)
        cache = self._get(args, kwargs, self._cache_name)
        check_cache(cache, self.layer_idx, self.where)
        pairs = [adapter.layer_prefix(self.layer_idx) for adapter in live]
        keys = torch.cat([k for k, _ in pairs], dim=1) if len(pairs) > 1 else pairs[0][0]
        values = torch.cat([v for _, v in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
        hidden = self._get(args, kwargs, self._hidden_name)
        q_len = hidden.shape[-2]
        kv_len = cache.get_mask_sizes(q_len, self.layer_idx)[0] if cache is not None else q_len
        causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
        mask = widen_mask(self._get(args, kwargs, "attention_mask"), keys.shape[1], q_len, kv_len, causal,
                          implementation, hidden.device, self.where)
        stand_in = PrefixedCache(cache, keys, values, None if mask is None else mask.shape[-1], self.where)
        args, kwargs = self._set(args, kwargs, "attention_mask", mask)
        args, kwargs = self._set(args, kwargs, self._cache_name, stand_in)
        self._pending[threading.get_ident()] = stand_in
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        stand_in = self._pending.pop(threading.get_ident(), None)
        if stand_in is not None and stand_in.calls != 1:
            raise PrefixUnsupportedError(
                f"{self.where} ({type(module).__name__}) called {self._cache_name}.update() {stand_in.calls} times in "
                "one forward instead of once, so its keys/values did not pass through the prefix; prefix tuning "
                "cannot attach to this attention class.")
        return None

    def remove_hooks(self) -> None:
        self._pre.remove()
        self._post.remove()


def attach(module: nn.Module, path: str, adapter: PrefixTuning) -> None:
    """Let ``adapter`` prepend its prefix in ``module`` (hooks are created on first use)."""
    site = module.__dict__.get(_SITE)
    if site is None:
        site = PrefixSite(module, path)
        module.__dict__[_SITE] = site
    site.adapters.append(adapter)


def detach(module: nn.Module, adapter: PrefixTuning) -> None:
    """Remove ``adapter`` from ``module``; drop the hooks once no prefix adapter is left."""
    site = module.__dict__.get(_SITE)
    if site is None:
        return
    site.adapters = [a for a in site.adapters if a is not adapter]
    if not site.adapters:
        site.remove_hooks()
        del module.__dict__[_SITE]
