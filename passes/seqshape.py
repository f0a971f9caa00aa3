"""Which dimensions of which nodes are the sequence, found by re-propagating shapes.

After the cut at layer K, every node downstream of the residual stream must run on the
pruned length ``n'``. Dynamo bakes the original length ``N`` into the graph as literals
(``view(x, (1, 43, -1, 16))``), and rewriting every ``43`` is wrong as soon as the prompt
length equals some other size (the hidden or head size). So this module never guesses from
values:

1. The downstream nodes are re-run on fake tensors whose pruned length is a sentinel ``P``:
   a prime larger than any size in the graph (fake tensors allocate nothing). A dimension
   that comes out as a multiple of ``P`` is a sequence dimension; no size can collide with it.
2. Shape literals of ``view``/``reshape``/``expand`` are mapped to their input's dimensions
   by aligning the original input and output shapes (products of dimension groups), so the
   literal that stands for a sequence dimension of the input, and only that one, becomes ``P``.
3. A tensor computed upstream of the cut but used downstream (RoPE cos/sin, the attention
   mask) is gathered along the smallest set of its length-``N`` dimensions that lets the
   consumer run: a stale length ``N`` meeting ``P`` fails to broadcast, so a wrong choice
   is detected by the op's own shape check. Ambiguity is an error, never a guess.
4. A slice that spans the whole sequence in the original (``k[..., :43, :]`` with the prompt's
   length baked in as its end, a cache taking every new key) spans the whole pruned one too:
   its end becomes open, so the slice keeps following the pruned length.
5. A factory that reads no tensor (``torch.arange(perm.size(0))``, baked as ``2 * N`` for an
   MoE's routed copies) is made again at ``k * n'`` for a consumer that fails on the original,
   sizes of exactly ``N`` excepted (step 3 gathers those). Fake ``index_put`` checks no broadcast,
   so ``setitem`` checks it here.

Anything this cannot explain raises ``PassError``; the backend then reports that pruning
did not happen.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .fx_utils import example_int, fake_value, hint, hints, is_shape_op
from .graph_pass import PassError


@dataclass(frozen=True)
class SeqLen:
    """Stands for ``factor * n'`` in a rewritten shape argument."""

    factor: int = 1


@dataclass(frozen=True)
class PaddedTo:
    """Stands for ``total - n'`` in a rewritten pad: the pad that brings the pruned sequence to the
    original's padded length ``total`` (a chunked scan's pad to a multiple of its chunk)."""

    total: int


@dataclass
class SeqPlan:
    """How to make the downstream nodes run on the pruned length."""

    # node -> (args, kwargs) with SeqLen placeholders where a length literal stood
    shape_args: dict[fx.Node, tuple[tuple, dict]] = field(default_factory=dict)
    # (consumer, upstream input) -> dims of the input to gather with the kept positions
    gathers: dict[tuple[fx.Node, fx.Node], tuple[int, ...]] = field(default_factory=dict)
    # (consumer, upstream factory) -> the factory's (args, kwargs) at the pruned length, for the consumer
    remade: dict[tuple[fx.Node, fx.Node], tuple[tuple, dict]] = field(default_factory=dict)


def plan_sequence_rewrite(
    downstream: Sequence[fx.Node],
    cut: fx.Node,
    replacement_shape: tuple[int, ...],
    seq_dim: int,
    seq_len: int,
    frozen: set[fx.Node],
) -> SeqPlan:
    """Plan the rewrite of ``downstream`` (graph order) when ``cut`` is replaced by a tensor
    of ``replacement_shape`` whose ``seq_dim`` is pruned. ``frozen`` nodes (parameters,
    buffers) never carry a sequence dimension.

    A dynamic graph is planned on its example sizes (hints); the plan names positions
    (which argument, which dimension), so it holds for every size the graph serves.
    ``seq_len`` is the example's N."""
    P = sentinel_length(downstream[0].graph)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    plan = SeqPlan()
    member = set(downstream)
    with mode, _quiet_fake_tensor_errors():
        values: dict[fx.Node, Any] = {}
        shape = list(replacement_shape)
        shape[seq_dim] = P
        ref = fake_value(cut)
        values[cut] = torch.empty(shape, dtype=ref.dtype, device=ref.device)

        def upstream_value(node: fx.Node, dims: tuple[int, ...] = ()) -> Any:
            v = fake_value(node)
            if isinstance(v, torch.Tensor):
                size = [P if d in dims else n for d, n in enumerate(hints(v.shape))]
                return torch.empty(size, dtype=v.dtype, device=v.device)
            return _as_fake(v)

        for node in downstream:
            if node.op == "output":
                continue
            args, kwargs = node.args, node.kwargs
            if is_shape_op(node):
                args, kwargs = _rewrite_shape_args(node, values, P, seq_len)
                plan.shape_args[node] = (args, kwargs)
            elif _pads_a_sequence(node, values, P):
                args, kwargs = _padded_to_the_original_total(node, values, P, seq_len)
                plan.shape_args[node] = (args, kwargs)
            elif _slices_a_sequence(node, values, P):
                args, kwargs = _whole_sequence_slices(node, values, P, seq_len)
                if args != node.args:
                    plan.shape_args[node] = (args, kwargs)
            crossing = [a for a in node.all_input_nodes if a not in member and a is not cut]
            options = []
            for a in crossing:
                v = fake_value(a)
                dims = (
                    []
                    if a in frozen or not isinstance(v, torch.Tensor)
                    else [d for d, n in enumerate(hints(v.shape)) if n == seq_len]
                )
                remade = _remade_factory(a, seq_len)
                options.append(list(_subsets(dims)) + ([_Remade(*remade)] if remade else []))
            values[node] = _run_minimal(node, args, kwargs, crossing, options, values, upstream_value, P, plan)
    return plan


@contextlib.contextmanager
def _quiet_fake_tensor_errors():
    """Rejected attempts are expected here; FakeTensor would log each one at ERROR level."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def sentinel_length(graph: fx.Graph) -> int:
    """A prime above 16x every size in the graph: it cannot collide with a real size or a
    product of a real size with a small factor."""
    largest = 1
    for node in graph.nodes:
        v = fake_value(node)
        if isinstance(v, torch.Tensor):
            largest = max([largest, *hints(v.shape)])
    return _next_prime(max(1_000_003, 16 * largest))


def _next_prime(n: int) -> int:
    def is_prime(m: int) -> bool:
        return m > 1 and all(m % p for p in range(2, int(m**0.5) + 1))

    while not is_prime(n):
        n += 1
    return n


def _is_seq(n: Any, P: int) -> bool:
    return isinstance(n, int) and n % P == 0 and n > 0


def _padded_sentinel(P: int) -> int:
    """Q: a padded sequence of the original's padded length T runs with length T * Q here (a multiple
    of T, so of its chunk, and recognisable: ``_is_padded``), and the runtime's at T."""
    return _next_prime(P + 1)


def _is_padded(n: Any, P: int) -> bool:
    return isinstance(n, int) and n > 0 and n % _padded_sentinel(P) == 0


@dataclass(frozen=True)
class _Remade:
    """An option for an input-free factory made upstream: made again at the pruned length."""

    args: tuple
    kwargs: dict

    def __len__(self) -> int:  # as costly as gathering one dim: tried after running unchanged
        return 1


# Factories whose sizes Dynamo bakes from the prompt's length: ``torch.arange(perm.size(0))`` in an
# MoE's dispatch (its N * top_k routed copies) reads no tensor, so no pass sees it downstream.
_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full}


def _remade_factory(node: fx.Node, seq_len: int):
    """A factory of no tensor inputs with a size of k * N (k >= 2) for its arguments: those sizes as
    ``SeqLen(k)``; None for anything else. A size of exactly N stays a gather (positions made
    upstream are the original ones); the consumer's shape check on the sentinel decides."""
    if node.op != "call_function" or node.target not in _FACTORIES or node.all_input_nodes or seq_len < 2:
        return None

    def scaled(n):
        return SeqLen(n // seq_len) if isinstance(n, int) and n > seq_len and n % seq_len == 0 else n

    args = list(node.args)
    if node.target is torch.arange:  # arange(end) or arange(0, end[, step])
        at = 0 if len(args) == 1 else 1 if len(args) >= 2 and args[0] == 0 else None
        if at is None:
            return None
        args[at] = scaled(args[at])
    elif args and isinstance(args[0], (tuple, list)):  # zeros((a, b)), full((a, b), value)
        args[0] = type(args[0])(scaled(n) for n in args[0])
    elif node.target is not torch.full:  # zeros(a, b)
        args = [scaled(n) for n in args]
    if args == list(node.args):
        return None
    return tuple(args), dict(node.kwargs)


def _run_minimal(node, args, kwargs, crossing, options, values, upstream_value, P, plan):
    """Run ``node`` with its upstream inputs gathered along the fewest length-N dims that work (or an
    input-free factory made again at the pruned length)."""
    by_size: dict[int, list] = {}
    for combo in itertools.product(*options) if options else [()]:
        by_size.setdefault(sum(len(c) for c in combo), []).append(combo)
    errors = []
    for size in sorted(by_size):
        found = []
        for combo in by_size[size]:
            bound = {
                a: _run(a, c.args, c.kwargs, values, {}, P) if isinstance(c, _Remade) else upstream_value(a, c)
                for a, c in zip(crossing, combo, strict=True)
            }
            try:
                out = _run(node, args, kwargs, values, bound, P)
            except _Rejected as e:
                errors.append(str(e))
                continue
            found.append((combo, out))
        if len(found) > 1:
            raise PassError(
                f"cannot tell which dimensions of the inputs of {node.name} are the sequence: "
                f"{[dict(zip((a.name for a in crossing), c, strict=True)) for c, _ in found]} all fit"
            )
        if found:
            combo, out = found[0]
            for a, dims in zip(crossing, combo, strict=True):
                if isinstance(dims, _Remade):
                    plan.remade[(node, a)] = (dims.args, dims.kwargs)
                elif dims:
                    plan.gathers[(node, a)] = dims
            return out
    raise PassError(
        f"{node.name} ({_describe(node)}) cannot run on the pruned sequence: {errors[-1] if errors else ''}"
    )


class _Rejected(Exception):
    pass


def _run(node, args, kwargs, values, bound, P):
    def load(x):
        if isinstance(x, fx.Node):
            if x in bound:
                return bound[x]
            if x in values:
                return values[x]
            return _as_fake(fake_value(x))
        if isinstance(x, SeqLen):
            return P * x.factor
        if isinstance(x, PaddedTo):
            return x.total * _padded_sentinel(P) - P
        return x

    a = fx.node.map_aggregate(args, load)
    k = fx.node.map_aggregate(kwargs, load)
    try:
        if node.op == "call_function":
            if node.target is operator.setitem:  # fake index_put checks no broadcast: the run would
                torch.broadcast_shapes(_shape(a[2]), a[0][a[1]].shape)
            return node.target(*a, **k)
        if node.op == "call_method":
            return getattr(a[0], node.target)(*a[1:], **k)
    except Exception as e:  # a shape mismatch: this choice of dims does not fit
        raise _Rejected(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    raise PassError(f"unexpected {node.op} node {node.name} downstream of the cut")


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _as_fake(v):
    """A value of another fake mode, made concrete (example sizes) in this one."""
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(hints(v.shape), hints(v.stride()), dtype=v.dtype, device=v.device)
    if isinstance(v, torch.SymInt):
        return hint(v)
    return v


def _subsets(dims: list[int]):
    for r in range(len(dims) + 1):
        yield from itertools.combinations(dims, r)


def _describe(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


# --------------------------------------------------------------------------- shape literals


def _slices_a_sequence(node: fx.Node, values, P: int) -> bool:
    """``x[..., a:b, :]`` (one tuple of slices, ``...``, ``None`` and ints: no tensor index, which
    may read several dims) on a pruned ``x``."""
    if not (
        node.op == "call_function"
        and node.target is operator.getitem
        and len(node.args) == 2
        and isinstance(node.args[1], tuple)
        and node.args[0] in values
        and all(isinstance(i, (slice, int)) or i is None or i is Ellipsis for i in node.args[1])
    ):
        return False
    x = values[node.args[0]]
    return isinstance(x, torch.Tensor) and any(_is_seq(n, P) or n > P for n in x.shape)


PADS = {torch.nn.functional.pad, torch._C._nn.pad, torch.ops.aten.constant_pad_nd.default}


def _pads_a_sequence(node: fx.Node, values, P: int) -> bool:
    """``F.pad(x, (.., 0, p, ..))``: nothing before, ``p`` after a sequence dimension of a pruned ``x``."""
    if not (node.op == "call_function" and node.target in PADS and node.args and node.args[0] in values):
        return False
    x, pad = values[node.args[0]], _pad_of(node)
    if not (isinstance(x, torch.Tensor) and isinstance(pad, (tuple, list))):
        return False
    return any(_is_seq(x.shape[-1 - j], P) and pad[2 * j] == 0 for j in range(len(pad) // 2))


def _pad_of(node: fx.Node):
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")


def _padded_to_the_original_total(node: fx.Node, values, P: int, seq_len: int) -> tuple[tuple, dict]:
    """A pad after a sequence pads the pruned one to the original's padded length T = N + p: a chunked
    scan (a gated delta rule) pads to a multiple of its chunk and unrolls its loop over T's chunks, and
    a pad of zeros past the last token changes neither its outputs nor its final state."""
    x, pad = values[node.args[0]], list(_pad_of(node))
    for j in range(len(pad) // 2):
        if _is_seq(x.shape[-1 - j], P) and pad[2 * j] == 0:
            if not isinstance(pad[2 * j + 1], int):  # dynamic=True: a pad computed from N in the graph
                raise PassError(
                    f"{node.name}: a pad of the sequence by {pad[2 * j + 1]!r}, a value of the graph "
                    "(dynamic=True), not a literal: a chunked scan is cut in static graphs only"
                )
            pad[2 * j + 1] = PaddedTo(seq_len + pad[2 * j + 1])
    args = list(node.args)
    if len(args) > 1:
        args[1] = tuple(pad)
        return tuple(args), dict(node.kwargs)
    return tuple(args), {**node.kwargs, "pad": tuple(pad)}


def _whole_sequence_slices(node: fx.Node, values, P: int, seq_len: int) -> tuple[tuple, dict]:
    """Open the end of each slice that spans a whole sequence dimension of the original input
    (start 0, step 1, end at or past the original length). A slice that ends at N of a sequence
    lengthened by a constant (a convolution's padding: ``conv1d(x, w, padding=k - 1)[..., :N]``) or
    padded to a chunk multiple (``_padded_to_the_original_total``) ends at n'. Any other slice of the
    sequence is left to the propagation's shape checks."""
    src, index = node.args
    assert isinstance(index, tuple)  # _slices_a_sequence matched a tuple index
    original = hints(fake_value(src).shape)
    pruned = values[src].shape
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    dims: list[Any] = []  # the input dim each index entry reads (None: it reads none)
    d = 0
    for i in index:
        if i is Ellipsis:
            d += len(original) - consumed
            dims.append(None)
        elif i is None:
            dims.append(None)
        else:
            dims.append(d)
            d += 1
    opened = []
    for i, d in zip(index, dims, strict=True):
        # dynamic=True: bounds that are values of the graph, read at their example
        start, stop = (example_int(b) for b in (i.start, i.stop)) if isinstance(i, slice) else (None, None)
        whole = (
            isinstance(i, slice)
            and d is not None
            and _is_seq(pruned[d], P)
            and i.step in (None, 1)
            and (
                (start in (None, 0) and isinstance(stop, int) and stop >= original[d])
                or (isinstance(start, int) and start <= -original[d] and i.stop is None)  # x[..., -N:]
            )
        )
        first_n = (
            isinstance(i, slice)
            and d is not None
            and (_is_lengthened(pruned[d], original[d], seq_len, P) or _is_padded(pruned[d], P))
            and start in (None, 0)
            and i.step in (None, 1)
            and stop == seq_len
        )
        opened.append(slice(None) if whole else slice(i.start, SeqLen(1), i.step) if first_n else i)
    return (src, tuple(opened)), dict(node.kwargs)


def _is_lengthened(pruned: Any, original: int, seq_len: int, P: int) -> bool:
    """A dimension of n' + c on the pruned sequence where it was N + c (0 < c < N)."""
    extra = original - seq_len
    return isinstance(pruned, int) and 0 < extra < seq_len and pruned == P + extra


def _rewrite_shape_args(node: fx.Node, values, P: int, seq_len: int) -> tuple[tuple, dict]:
    src = node.args[0]
    original_in = hints(fake_value(src).shape)
    original_out = hints(fake_value(node).shape)
    new_in = values[src].shape if src in values else original_in
    seq_in = {d for d, n in enumerate(new_in) if _is_seq(n, P)}
    sizes = list(cast(Sequence[Any], node.args[1]))  # normalize leaves one size tuple
    if not seq_in:
        return node.args, node.kwargs
    if node.target == "expand":
        offset = len(sizes) - len(original_in)
        for d in seq_in:
            sizes[d + offset] = -1  # keep the input's (pruned) length
        return (src, tuple(sizes)), {}
    for in_dims, out_dims in _view_groups(original_in, original_out):
        if not seq_in.intersection(in_dims):
            continue
        sized = [d for d in out_dims if original_out[d] != 1]  # size-1 dims ride along
        if len(sized) != 1:
            sized = _sequence_part_of_split(node, sized, original_in, original_out, seq_len)
        (d,) = sized
        if isinstance(sizes[d], int) and sizes[d] == -1:
            continue
        total = original_out[d]
        if total % seq_len:
            raise PassError(f"{node.name}: size {total} is not a multiple of the sequence length {seq_len}")
        sizes[d] = SeqLen(total // seq_len)
    return (src, tuple(sizes)), {}


def _sequence_part_of_split(node: fx.Node, sized: list[int], original_in, original_out, seq_len: int) -> list[int]:
    """A view that splits a dim holding the sequence into the sequence and constant parts: batch and
    sequence flattened for a feed-forward and split back (OPT: (B * N, D) -> (B, N, D)), or an MoE's
    top-k copies of each token ((N * 2, D) -> (N, 2, D)). The one output dim that is a multiple of N
    is the sequence; the others keep their sizes. Any other split (chunked attention: (124, D) ->
    (4, 31, D)) has no such dim, or more than one, and is refused. The fake propagation on the
    sentinel length then checks the split as it checks every shape."""
    multiples = [d for d in sized if original_out[d] % seq_len == 0]
    if len(multiples) != 1 or seq_len == 1:
        raise PassError(f"{node.name}: a view splits the sequence dimension {original_in} -> {original_out}")
    return multiples


def _view_groups(shape_in: Sequence[int], shape_out: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products: [1,43,64]->[1,43,4,16] gives
    ([0],[0]), ([1],[1]), ([2],[2,3])."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(shape_in) and j < len(shape_out):
        gi, gj = [i], [j]
        pi, pj = shape_in[i], shape_out[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj and i < len(shape_in):
                gi.append(i)
                pi *= shape_in[i]
                i += 1
            elif j < len(shape_out):
                gj.append(j)
                pj *= shape_out[j]
                j += 1
            else:
                raise PassError(f"cannot align view {list(shape_in)} -> {list(shape_out)}")
        groups.append((gi, gj))
    # trailing size-1 dims join the last group
    if groups:
        groups[-1][0].extend(range(i, len(shape_in)))
        groups[-1][1].extend(range(j, len(shape_out)))
    return groups
