"""The eager reference: the same pruning on a Hugging Face VLM, with hooks instead of FX.

The oracle every compiled result is compared with (tests), and what `era-compile fidelity`
runs to look inside attention.

Plain PyTorch, no compile. Forward pre-hooks on the decoder layers cut the sequence at layer
K in prefill (the same algorithm functions the ops call: selection, BTR, sequence assembly,
per sample: a ragged batch is left-padded to its longest kept sequence) and gather every
per-token argument of the later layers (cos/sin, mask, position ids). A registered attention
function reads layer K-1's queries and keys for the saliency and adds the LAR bias in layers
>= K. In decode steps the pruned layers' caches hold the kept tokens plus the generated
ones: their bias is the prefill bias extended by 0, and Hugging Face's mask (over original
positions) is gathered onto those keys. The cache stays compact here whatever the padding:
the compiled runtime's layout is its own business, the attention it computes must match
this.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from era_compile.algorithms.sequence import real_tokens
from era_compile.compat import cache_kwarg
from era_compile.config import ERAConfig
from era_compile.ops.attention import default_scale
from era_compile.ops.prune import recycle_kept, select_anchors, without_lar

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_ACTIVE: EagerReference | None = None


def _reference_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    ref, idx = _ACTIVE, getattr(module, "layer_idx", None)
    if ref is None or idx is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    ref.observe(idx, query, key, attention_mask, scaling)
    if ref.attention_observer is not None:
        ref.report_attention(idx, query, key, attention_mask, scaling, window_of(module, kwargs))
    if not ref.pruned_layer(idx):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    k_len = key.shape[2]
    attention_mask = ref.mask_over_cache(attention_mask, query.shape[2], k_len, window_of(module, kwargs))
    bias = ref.bias_for(k_len)
    rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, rep), repeat_kv(value, rep)
    q_len = query.shape[2]
    mask = bias[:, None, None, :].to(torch.float32).expand(-1, 1, q_len, k_len)
    if attention_mask is not None:
        blocked = ~attention_mask if attention_mask.dtype == torch.bool else None
        mask = mask.masked_fill(blocked, float("-inf")) if blocked is not None else mask + attention_mask
    elif q_len > 1:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = mask.masked_fill(~causal, float("-inf"))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def window_of(module, kwargs) -> int | None:
    """A sliding-window layer's window W (a query sees the keys less than W positions back), as
    Hugging Face's attention modules name it; None for a full-attention layer."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return window if isinstance(window, int) else None


def attends(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer holds softmax attention, as Hugging Face names its modules (``...Attention``;
    a hybrid decoder's other layers hold a ``GatedDeltaNet``, ``ShortConv``, ``Mamba2Mixer``, ``MoE``...)."""
    return any(type(m).__name__.endswith("Attention") for m in layer.modules())


def register_reference_attention() -> None:
    """Name the reference's attention to transformers (``attn_implementation="era_reference"``), and
    its masks (built per attention implementation: without it, HF would hand the reference no mask
    and padding would be silently ignored). Done when a reference is first made; repeats change
    nothing."""
    if AttentionInterface._global_mapping.get("era_reference") is not _reference_attention:
        AttentionInterface.register("era_reference", _reference_attention)
    if AttentionMaskInterface._global_mapping.get("era_reference") is not sdpa_mask:
        AttentionMaskInterface.register("era_reference", sdpa_mask)


def visual_token_ids(model) -> list[int]:
    """The placeholder ids of image and video features, from the model's config. The eager side
    (this oracle, calibration) reads them; the compiled passes find the merge instead."""
    named = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    ids: list[int] = [i for i in named if i is not None]
    if not ids:
        raise ValueError("the model config names no image_token_id or video_token_id")
    return ids


def decoder_of(model: PreTrainedModel) -> torch.nn.Module:
    """The module holding the language model's ``layers`` (``get_decoder`` of a VLM may return a
    whole causal LM, e.g. BLIP-2's OPT, whose own decoder holds them)."""
    decoder = model.get_decoder()
    for _ in range(3):
        if hasattr(decoder, "layers"):
            return decoder
        decoder = decoder.get_decoder() if hasattr(decoder, "get_decoder") else getattr(decoder, "model", decoder)
    raise ValueError(f"no decoder layers found under {type(model).__name__}.get_decoder()")


class EagerReference:
    """``EagerReference(model, config)(**inputs)`` runs ``model`` eagerly with the pruning of ``config``."""

    # set while the hooks are on (``_hooked``)
    _visual_mask: torch.Tensor  # bool [B, N]
    _capture: int | None  # the layer whose queries and keys the selection reads
    _seen: tuple[Any, Any, Any, Any] | None  # that layer's (query, key, attention_mask, scaling)
    _keep: torch.Tensor | None  # after the prefill's cut: the kept positions [B, n']
    _bias: torch.Tensor | None  # their LAR bias
    _seq_len: int  # N
    _real: torch.Tensor | None  # bool [B, N], which positions hold a token (None: no padding)
    _pruning: bool  # this forward is the prefill that prunes
    _own_saliency: bool  # the selection reads layer K's queries and keys (on the unpruned input), not K - 1's
    _generated: int  # tokens run since the prefill (the current step's included)

    def __init__(
        self,
        model: PreTrainedModel,
        config: ERAConfig,
        *,
        drop_decode_bias: bool = False,
        attention_observer: Callable | None = None,
    ):
        register_reference_attention()
        self.model = model
        self.config = config.replace(layer=config.resolve_layer()[0], profile=None)  # layer="auto" resolved
        self.decoder: Any = decoder_of(model)  # Hugging Face's: its layers and DeepStack hook are read by name
        self.layers = cast(torch.nn.ModuleList, self.decoder.layers)  # Hugging Face's decoder layers
        self.visual_token_ids = torch.tensor(visual_token_ids(model))
        self.drop_decode_bias = drop_decode_bias
        # observer(layer, query, key, attention_mask, bias or None, scale, key_positions [B, Lk]):
        # what every attention call sees, keys labelled with their original positions
        self.attention_observer = attention_observer
        self.last: dict = {}

    # ------------------------------------------------------------------ hooks' callbacks

    def observe(self, layer: int, query, key, attention_mask, scaling) -> None:
        if self._capture is not None and layer == self._capture:
            self._seen = (query, key, attention_mask, scaling)

    def report_attention(self, layer: int, query, key, attention_mask, scaling, window: int | None = None) -> None:
        observer = self.attention_observer
        if observer is None:  # nobody listens
            return
        k_len = key.shape[2]
        if self.pruned_layer(layer):
            positions, bias = self.cached_positions(k_len), self.bias_for(k_len)
            attention_mask = self.mask_over_cache(attention_mask, query.shape[2], k_len, window)
        else:
            positions = torch.arange(k_len, device=key.device).expand(key.shape[0], k_len)
            bias = None
        scale = scaling if scaling is not None else default_scale(query.shape[-1])
        observer(layer, query, key, attention_mask, bias, scale, positions)

    def _after_cut(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept positions [B, n'] and their LAR bias, which the prefill's cut set (asked only after it)."""
        if self._keep is None or self._bias is None:
            raise RuntimeError("EagerReference: the prefill has not cut the sequence yet")
        return self._keep, self._bias

    def pruned_layer(self, layer: int) -> bool:
        return self._keep is not None and layer >= self.config.resolved_layer

    def bias_for(self, k_len: int):
        """LAR bias of the k_len keys of a pruned layer: prefill's, then 0 for generated tokens (of
        them, the last k_len: a sliding-window cache keeps its newest rows only)."""
        _, prefill_bias = self._after_cut()
        bias = prefill_bias if self.config.rectify else without_lar(prefill_bias)  # empty slots stay blocked
        if self._generated:
            extra = torch.zeros(bias.shape[0], self._generated, device=bias.device)
            bias = torch.cat([torch.zeros_like(bias) if self.drop_decode_bias else bias, extra], -1)
        return bias[:, bias.shape[1] - k_len :]

    def mask_over_cache(self, attention_mask, q_len: int, k_len: int, window: int | None = None):
        """A pruned layer's mask over its k_len cached keys. Hugging Face sizes a decode step's mask
        from the cache it sees, so over n' + t rows it reads its padding mask at positions 0..n'+t-1,
        not at the rows' own, and a sliding window by rows: the mask is rebuilt from the rows'
        original positions, which positions hold a token (``_real``), and the window (a query sees
        the keys less than W positions back). A mask over the original positions (longer than the
        cache) is gathered."""
        over_positions = attention_mask is not None and attention_mask.shape[-1] != k_len
        if over_positions and (window is None or q_len == k_len):
            return _take(attention_mask, self.cached_positions(k_len), 3)  # over the original positions
        if q_len == k_len:  # the prefill: the masks were gathered at the cut
            return attention_mask
        if window is None and self._real is None:  # no padding and no window: causal over the rows
            return attention_mask
        keep, _ = self._after_cut()
        real = self._real.gather(1, keep) if self._real is not None else torch.ones_like(keep, dtype=torch.bool)
        generated = keep.new_ones(keep.shape[0], self._generated, dtype=torch.bool)
        held = torch.cat([real, generated], 1)[:, -k_len:]
        positions = self.cached_positions(k_len)
        keys, queries = positions[:, None, :], positions[:, -q_len:, None]  # the queries are the newest rows
        visible = held[:, None, :] & (keys <= queries)
        if window is not None:
            visible &= queries - keys < window
        return visible[:, None]

    def cached_positions(self, k_len: int) -> torch.Tensor:
        """Original positions of a pruned layer's cached keys: the kept ones, then the generated (the
        last k_len of them)."""
        keep, _ = self._after_cut()
        generated = torch.arange(self._seq_len, self._seq_len + self._generated, device=keep.device)
        return torch.cat([keep, generated.expand(keep.shape[0], -1)], -1)[:, -k_len:]

    @staticmethod
    def _layer_mask(kwargs) -> torch.Tensor | None:
        mask = kwargs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None

    def _prune(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._keep is not None:  # a decode step: the cache already holds the kept tokens
            self._pruning = False
            self._generated += hidden.shape[1]  # the step's tokens, at original positions N + t, ...
            return None
        self._pruning = True  # the prefill: the layers after this one run on the kept tokens
        K, cfg = self.config.resolved_layer, self.config
        if self._own_saliency:  # layer K's queries and keys on the unpruned input: the layer run once more
            self._capture = K  # without its cache (and past its hooks), its output dropped
            module.forward(*args, **{**kwargs, cache_kwarg(module.forward): None})
        if self._seen is None:
            raise RuntimeError(f"EagerReference: layer {self._capture}'s attention did not run through the reference's")
        query, key, attn_mask, scaling = self._seen
        self._capture = None
        if hidden.shape[0] != self._visual_mask.shape[0]:  # beam search expanded every prompt into its beams
            self._visual_mask = self._visual_mask.repeat_interleave(hidden.shape[0] // self._visual_mask.shape[0], 0)
        is_causal = attn_mask is None and query.shape[2] > 1
        scale = scaling if scaling is not None else default_scale(query.shape[-1])
        anchor_mask, confidence = select_anchors(
            hidden,
            self._visual_mask,
            query,
            key,
            attn_mask,
            is_causal,
            scale,
            cfg.keep_ratio,
            cfg.keep_tokens,
            cfg.strategy,
            json.loads(json.dumps(cfg.strategy_options())),
        )
        layer_mask = self._layer_mask(kwargs)  # layer K's own mask shows the padding, which goes too
        self._real = real_tokens(layer_mask, hidden.shape[0], hidden.shape[1])
        keep, hidden_kept, bias = recycle_kept(
            hidden, self._visual_mask, anchor_mask, confidence, cfg.recycle, cfg.weight_norm, self._real
        )
        self._keep, self._bias, self._seq_len = keep, bias, hidden.shape[1]
        anchors = [  # per sample
            torch.nonzero(a[v]).flatten() for a, v in zip(anchor_mask, self._visual_mask, strict=True)
        ]
        self.last = {
            "keep_index": keep,
            "log_bias": bias,
            "anchors": anchors,
            "anchor_mask": anchor_mask,
            "hidden": hidden_kept,  # what layer K receives: kept tokens, recycled
        }
        args = (hidden_kept,) + tuple(args[1:]) if args else args
        if not args:
            kwargs["hidden_states"] = hidden_kept
        return self._gather_args(args), self._gather_kwargs(kwargs)

    def _gather_args(self, args):
        """Positional per-token inputs after the hidden states (Gemma 4's per-layer input [B, N, D'])."""
        return args[:1] + tuple(self._per_token(a) for a in args[1:])

    def _per_token(self, x):
        """x at the kept positions if it runs along the prompt ([B, N, ...]), else as it is."""
        keep, _ = self._after_cut()
        if (
            isinstance(x, torch.Tensor)
            and x.dim() >= 2
            and x.shape[1] == self._seq_len
            and x.shape[0] in (1, keep.shape[0])
        ):
            return _take(x, keep, 1)
        return x

    def _gather_kwargs(self, kwargs):
        keep, _ = self._after_cut()
        kwargs = {
            name: value
            if name in ("attention_mask", "position_embeddings", "position_ids", "hidden_states")
            else self._per_token(value)
            for name, value in kwargs.items()
        }
        if kwargs.get("position_embeddings") is not None:  # learned positions (OPT) were added before layer 0
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (_take(cos, keep, 1), _take(sin, keep, 1))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # a linear layer's padding mask [B, N] (hybrid decoders)
            kwargs["attention_mask"] = _take(mask, keep, 1)
        elif mask is not None:
            kwargs["attention_mask"] = _take(_take(mask, keep, 2), keep, 3)
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3:  # M-RoPE's [3, B, N]
            kwargs["position_ids"] = torch.take_along_dim(positions, keep.expand(positions.shape[0], -1, -1), 2)
        elif positions is not None:
            kwargs["position_ids"] = _take(positions, keep, 1)
        return kwargs

    def _later(self, module, args, kwargs):
        if not self._pruning:  # a decode step: positions are the new tokens' own
            return None
        return self._gather_args(args), self._gather_kwargs(kwargs)

    # ------------------------------------------------------------------ running

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, self.visual_token_ids.to(input_ids.device))

    @contextlib.contextmanager
    def active(self, input_ids: torch.Tensor):
        """This pruning on the model, for a prompt with an image (one without runs as it is), and
        eager even when the model was compiled: the oracle must not run the backend it checks."""
        with torch.compiler.set_stance("force_eager"):
            if bool(self.visual_positions(input_ids).any()):
                with self._hooked(input_ids):
                    yield self
            else:
                yield self

    @contextlib.contextmanager
    def _hooked(self, input_ids: torch.Tensor):
        global _ACTIVE
        self._visual_mask = self.visual_positions(input_ids)
        K = self.config.resolved_layer
        # no softmax attention before the cut (K = 0, or a hybrid decoder's linear layer K - 1): layer K's own
        self._own_saliency = K == 0 or not attends(self.layers[K - 1])
        self._capture = None if self._own_saliency else K - 1
        self._seen, self._keep, self._bias, self._pruning, self._real = None, None, None, False, None
        self._generated = 0
        text_config = self.model.config.get_text_config()
        previous = text_config._attn_implementation
        handles = [self.layers[K].register_forward_pre_hook(self._prune, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(self._later, with_kwargs=True) for layer in self.layers[K + 1 :]]
        text_config._attn_implementation = "era_reference"
        added = self._gather_added_features()
        _ACTIVE = self
        try:
            yield
        finally:
            _ACTIVE = None
            text_config._attn_implementation = previous
            for h in handles:
                h.remove()
            if added:
                del self.decoder._deepstack_process

    def _gather_added_features(self) -> bool:
        """Visual features added again after a decoder layer (DeepStack: Hugging Face's
        ``_deepstack_process(hidden, visual_pos_masks, features)``, one feature row per visual token
        in order): after the cut, each kept visual token gets its own row, and a pruned one none."""
        add = getattr(self.decoder, "_deepstack_process", None)
        if add is None:
            return False

        def add_to_kept(hidden, visual_pos_masks, features):
            if self._keep is None or not self._pruning or hidden.shape[1] == visual_pos_masks.shape[1]:
                return add(hidden, visual_pos_masks, features)
            rows = visual_pos_masks.flatten().cumsum(0).view_as(visual_pos_masks) - 1  # each token's feature row
            kept = _take(visual_pos_masks, self._keep, 1)
            return add(hidden, kept, features[_take(rows, self._keep, 1)[kept]])

        self.decoder._deepstack_process = add_to_kept  # this instance only, while the pruning is active
        return True

    @torch.no_grad()
    def __call__(self, **inputs) -> Any:
        with self.active(inputs["input_ids"]):
            return self.model(**inputs)

    @torch.no_grad()
    def generate(self, **kwargs) -> Any:
        """``model.generate`` with this pruning in prefill and the bias kept in every decode step."""
        with self.active(kwargs["input_ids"]):
            return self.model.generate(**kwargs)


def _take(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """x gathered at the kept positions along ``dim`` (dim 0 is the batch, or 1 to broadcast)."""
    shape = [keep.shape[0] if i == 0 else keep.shape[1] if i == dim else 1 for i in range(x.dim())]
    return torch.take_along_dim(x, keep.reshape(shape), dim)
