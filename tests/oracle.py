"""An oracle for pruning that shares no code with era_compile's passes, ops or reference.

At K = 0 with recycling and rectification off, pruning drops visual tokens before the first
decoder layer: every kept token then attends over the kept tokens before it, at their
original positions. The same numbers come out of the unpruned model if every decoder layer's
attention mask hides the dropped tokens as keys: no kept token sees a dropped one, so the
logits of every kept position, the last one included, are the pruned run's.

The oracle runs the model eagerly, as transformers wrote it (its own merge, positions and
masks), and only adds the dropped tokens to the mask each decoder layer receives: to the
model's own 4-D mask when it built one (bidirectional image attention, sliding windows), or
to a causal one when it passed none. The anchors are fixed in advance by a strategy
registered here (``FIXED``: evenly spaced over each sample's visual tokens), so the oracle
knows which tokens are kept without asking the backend.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from era_compile.algorithms import Selection, register_strategy

FIXED = "oracle_evenly_spaced"


def evenly_spaced(num_visual: int, k: int) -> torch.Tensor:
    """k of T positions, evenly spaced, ascending and distinct."""
    return torch.linspace(0, num_visual - 1, k).round().long().unique()


def _fixed_anchors(inputs, k: int, options: dict) -> Selection:
    batch, num_visual = inputs.hidden.shape[:2]
    anchors = evenly_spaced(num_visual, k)
    if anchors.numel() != k:
        raise ValueError(f"{k} evenly spaced anchors of {num_visual} are not distinct")
    return Selection(anchors.expand(batch, k).to(inputs.hidden.device))


register_strategy(FIXED, _fixed_anchors, overwrite=True)


def kept_positions(visual: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, N]: text tokens and the FIXED anchors among each sample's visual tokens."""
    keep = ~visual.clone()
    for b in range(visual.shape[0]):
        positions = torch.nonzero(visual[b]).flatten()
        keep[b, positions[evenly_spaced(positions.numel(), k)]] = True
    return keep


def _masked(mask, keep: torch.Tensor, query_len: int):
    """The layer's mask with the dropped tokens hidden as keys (a causal mask where it had none: the
    queries are the last ``query_len`` of the keys)."""
    keys = keep[:, None, None, :]
    if mask is None:
        key_len = keep.shape[1]
        causal = torch.ones(query_len, key_len, dtype=torch.bool, device=keep.device).tril(key_len - query_len)
        return causal[None, None] & keys
    if mask.dtype == torch.bool:
        return mask & keys
    return mask.masked_fill(~keys, torch.finfo(mask.dtype).min)


def _cached_rows(kwargs, layer: int) -> int:
    """Rows a layer's cache holds before this call appends to it (a sliding-window layer's: the last
    W - 1 positions at most)."""
    caches = [v for v in kwargs.values() if hasattr(v, "layers") and hasattr(v, "get_seq_length")]  # by any name
    if not caches or layer >= len(caches[0].layers):
        raise ValueError("a decode step with no mask and no cache the oracle can find: it cannot tell the keys")
    cache = caches[0]
    keys = getattr(cache.layers[layer], "keys", None)
    return keys.shape[-2] if isinstance(keys, torch.Tensor) and cache.layers[layer].is_initialized else 0


@contextlib.contextmanager
def dropped_tokens_hidden(model, keep: torch.Tensor):
    """Every decoder layer of ``model`` sees ``keep``'s dropped tokens as masked keys, in the prompt
    and in every decode step after it (the generated tokens are kept). A layer's keys are the last
    of the positions so far: all of them, or a sliding window's last W - 1 and the new ones."""
    decoder = model.get_decoder()
    while not hasattr(decoder, "layers"):  # a whole causal LM (BLIP-2's OPT): its own decoder holds them
        decoder = decoder.get_decoder()
    layers = decoder.layers
    seen: list[bool] = []
    positions = [0]  # tokens run so far: the prompt, then one per decode step

    def hide(index: int, module, args, kwargs):
        if "attention_mask" not in kwargs:
            raise ValueError(
                f"{type(module).__name__} takes its attention mask positionally: the oracle cannot reach it"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        query_len = hidden.shape[1]
        if index == 0:
            positions[0] += query_len
        total = positions[0]
        kept = torch.cat([keep, keep.new_ones(keep.shape[0], total - keep.shape[1])], 1)
        mask = kwargs["attention_mask"]
        if mask is not None:
            key_len = mask.shape[-1]
        else:  # a prompt's keys are its own; a decode step's, the cache's and the new ones
            key_len = query_len if query_len == total else _cached_rows(kwargs, index) + query_len
        kwargs["attention_mask"] = _masked(mask, kept[:, total - key_len :], query_len)
        seen.append(True)
        return args, kwargs

    handles = [
        layer.register_forward_pre_hook(functools.partial(hide, i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
    if len(seen) % len(layers):
        raise AssertionError(f"the oracle masked {len(seen)} layer calls for {len(layers)} decoder layers")


@torch.no_grad()
def last_logits(model, inputs: dict, visual: torch.Tensor, k: int) -> torch.Tensor:
    """The unpruned model's last-position logits with all but the kept tokens hidden as keys."""
    keep = kept_positions(visual, k)
    with torch.compiler.set_stance("force_eager"), dropped_tokens_hidden(model, keep):
        return model(**inputs).logits[:, -1]


@torch.no_grad()
def generate(model, inputs: dict, visual: torch.Tensor, k: int, **kwargs):
    """The unpruned model's ``generate`` with all but the kept tokens hidden as keys in every step."""
    keep = kept_positions(visual, k)
    with torch.compiler.set_stance("force_eager"), dropped_tokens_hidden(model, keep):
        return model.generate(**inputs, **kwargs)
