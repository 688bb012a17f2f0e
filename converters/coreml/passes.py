"""Graph rewrites on a captured MLX :class:`~mlx_zeta.converters.coreml.graph.Graph`, run by
:func:`~mlx_zeta.converters.coreml.lower.lower_graph` before emitting MIL. Each keeps the
function's values; they exist to give Core ML its fused ops (attention, pooling), to keep
every tensor at rank <= 5 (Core ML's limit) and to keep constants small.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .graph import MASK_CLAMP, SHAPE_OPS, Graph, Node, scalar_const

__all__ = ["fuse_attention", "absorb_transposes", "prune", "fold_pooling_windows", "squeeze_gathers",
           "unbroadcast_constants", "ELEMENTWISE", "BROADCASTING"]

ELEMENTWISE = ("Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum")
BROADCASTING = ELEMENTWISE + ("Power", "Remainder", "Equal", "NotEqual", "Less", "LessEqual", "Greater",
                              "GreaterEqual", "LogicalAnd", "LogicalOr", "Select")  # numpy-broadcasting ops


def fuse_attention(graph: Graph) -> int:
    r"""Rewrite ``Matmul(Softmax(Select(m, Matmul(c \cdot q, K^T), fill) | Matmul(..) + M), V)``
    into one ``SDPA`` node (MIL ``scaled_dot_product_attention``), in place; returns the count.

    Exactness conditions: every intermediate (scaled q, scores, masked scores, probabilities,
    ``K^T``) has one consumer; ``K^T`` is a Transpose swapping the last two axes (optionally
    Broadcast after); the scale is a scalar constant reached through shape ops only; a Select
    fill is a constant at or below ``-MASK_CLAMP`` (so it is the bool mask's "no attention").
    The q scale is kept in ``attrs["scale"]`` (applied as ``q * scale * sqrt(D)`` when it is not
    ``1/sqrt(D)``); the shape ops between the scale Multiply and the Matmul are rewired onto q.
    """
    prod, uses = graph.producers(), graph.consumers()
    fused = 0
    for node in graph.nodes:
        match = _match_attention(graph, node, prod, uses)
        if match is None:
            continue
        scores, transpose, mask, kind = match
        scale = _take_scale(graph, scores, prod, uses)  # rewires q first: read scores.inputs after it
        v = _through_broadcasts(node.inputs[1], prod, uses)
        _to_sdpa(graph, node, [scores.inputs[0], transpose.inputs[0], v], mask, kind, scale)
        fused += 1
        prod, uses = graph.producers(), graph.consumers()
    return fused


def _through_broadcasts(name: str, prod: Dict[str, Node], uses: Dict[str, int]) -> str:
    """``name`` followed back through single-use Broadcast nodes."""
    while prod.get(name) is not None and prod[name].name == "Broadcast" and uses.get(name, 0) == 1:
        name = prod[name].inputs[0]
    return name


def _match_masked_scores(graph: Graph, probs: Node, prod: Dict[str, Node], uses: Dict[str, int]):
    """``(scores Matmul or None, mask name or None, "bool" | "add" | None)`` under a Softmax."""
    s = prod.get(probs.inputs[0])
    if s is not None and s.name == "Select" and uses.get(s.outputs[0], 0) == 1:
        fill = scalar_const(graph, s.inputs[2], prod)
        if fill is None or fill > -MASK_CLAMP or s.in_dtypes[0] != "bool":
            return None, None, None
        return prod.get(s.inputs[1]), s.inputs[0], "bool"
    if s is not None and s.name == "Add" and uses.get(s.outputs[0], 0) == 1:
        a, b = (prod.get(i) for i in s.inputs)
        k = 0 if a is not None and a.name == "Matmul" else 1 if b is not None and b.name == "Matmul" else None
        if k is None:
            return None, None, None
        return (a, b)[k], s.inputs[1 - k], "add"
    return s, None, None


def _match_attention(graph: Graph, node: Node, prod: Dict[str, Node],
                     uses: Dict[str, int]) -> Optional[Tuple[Node, Node, Optional[str], Optional[str]]]:
    """``(scores Matmul, K^T Transpose, mask, mask kind)`` if ``node`` is the ``P @ V`` Matmul of
    an attention pattern meeting the exactness conditions of :func:`fuse_attention`, else None."""
    one = lambda n: uses.get(n, 0) == 1  # noqa: E731
    if node.name != "Matmul" or node.in_shapes[0][-1] != node.in_shapes[1][-2]:
        return None
    p = prod.get(node.inputs[0])
    if p is None or p.name != "Softmax" or not one(p.outputs[0]):
        return None
    s, mask, kind = _match_masked_scores(graph, p, prod, uses)
    if s is None or s.name != "Matmul" or not one(s.outputs[0]):
        return None
    kt = _through_broadcasts(s.inputs[1], prod, uses)
    t = prod.get(kt)
    if t is None or t.name != "Transpose" or not one(kt) or not _swaps_last_two(t.args[0], len(s.in_shapes[1])):
        return None
    return s, t, mask, kind


def _take_scale(graph: Graph, scores: Node, prod: Dict[str, Node], uses: Dict[str, int]) -> float:
    """The scalar constant multiplying q (through single-use shape ops) in ``scores = q @ K^T``,
    or 1.0; when found, the Multiply is bypassed (its unscaled input rewired into the chain)."""
    chain, q = [], scores.inputs[0]
    while prod.get(q) is not None and prod[q].name in SHAPE_OPS and uses.get(q, 0) == 1:
        chain.append(prod[q])
        q = prod[q].inputs[0]
    m = prod.get(q)
    if m is None or m.name != "Multiply" or uses.get(q, 0) != 1:
        return 1.0
    for j in (0, 1):
        c = scalar_const(graph, m.inputs[j], prod)
        if c is not None:
            (chain[-1].inputs if chain else scores.inputs)[0] = m.inputs[1 - j]
            return c
    return 1.0


def _to_sdpa(graph: Graph, node: Node, qkv: list, mask: Optional[str], kind: Optional[str], scale: float) -> None:
    """Turn ``node`` into the ``SDPA`` node reading ``q, k, v`` (and ``mask``)."""
    inputs = qkv + ([mask] if mask is not None else [])
    shapes = {n: sh for n2 in graph.nodes for n, sh in zip(n2.outputs, n2.out_shapes)}
    shapes.update({n: sh for n, sh, _ in graph.inputs})
    shapes.update({n: c.shape for n, c in graph.constants.items()})
    node.name, node.inputs, node.args = "SDPA", inputs, []
    node.in_shapes = [tuple(shapes[i]) for i in inputs]
    node.in_dtypes = [node.out_dtypes[0]] * 3 + (["bool" if kind == "bool" else node.out_dtypes[0]] if mask else [])
    node.attrs = {"scale": scale, "mask": kind}


def _swaps_last_two(perm, rank: int) -> bool:
    return list(perm) == list(range(rank - 2)) + [rank - 1, rank - 2]


def absorb_transposes(graph: Graph) -> None:
    """``Matmul(x, Transpose(w))`` / ``AddMM`` with a last-two-axes swap read ``w`` with
    ``transpose_y`` (weights, LUT-compressed ones included, are never transposed at run time)."""
    prod = graph.producers()
    for node in graph.nodes:
        t = prod.get(node.inputs[1]) if node.name in ("Matmul", "AddMM") else None
        if t is not None and t.name == "Transpose" and _swaps_last_two(t.args[0], len(t.in_shapes[0])):
            node.inputs[1], node.in_shapes[1] = t.inputs[0], t.in_shapes[0]
            node.attrs["transpose_y"] = True


def prune(graph: Graph) -> None:
    """Drop nodes no output depends on (``Depends`` keeps only its first input alive)."""
    live = {o[0] for o in graph.outputs}
    keep = []
    for node in reversed(graph.nodes):
        if any(o in live for o in node.outputs):
            keep.append(node)
            live.update(node.inputs[:1] if node.name == "Depends" else node.inputs)
    graph.nodes = keep[::-1]


def _readers(graph: Graph) -> Dict[str, list]:
    """Nodes reading each value (graph outputs count as one more reader, as unknown)."""
    readers: Dict[str, list] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    for o in graph.outputs:
        readers.setdefault(o[0], []).append(None)
    return readers


def _single_consumer_chain(readers: Dict[str, list], start: Node, names) -> Optional[list]:
    """``start`` followed by nodes named ``names`` in order, each the only reader of the previous."""
    chain = [start]
    for name in names:
        nxt = readers.get(chain[-1].outputs[0], [])
        if len(nxt) != 1 or nxt[0] is None or nxt[0].name != name:
            return None
        chain.append(nxt[0])
    return chain


def fold_pooling_windows(graph: Graph) -> int:
    """MLX traces ``MaxPool2d(k, stride=k)`` on (N, H, W, C) as Reshape to the rank-6
    (N, H/kh, kh, W/kw, kw, C), Transpose (0, 1, 3, 2, 4, 5), Reduce max over the window axes,
    Squeeze; that chain becomes one ``MaxPool2d`` node (MIL ``max_pool``), in place. Returns
    the count."""
    count, readers = 0, _readers(graph)
    for node in list(graph.nodes):
        if node.name != "Reshape" or len(node.in_shapes[0]) != 4 or len(node.out_shapes[0]) != 6:
            continue
        n, h, w, c = node.in_shapes[0]
        n2, ho, kh, wo, kw, c2 = node.out_shapes[0]
        if (n2, c2, ho * kh, wo * kw) != (n, c, h, w):
            continue
        chain = _single_consumer_chain(readers, node, ("Transpose", "Reduce", "Squeeze"))
        if chain is None:
            continue
        _, t, r, sq = chain
        if (list(t.args[0]) != [0, 1, 3, 2, 4, 5] or r.args[0] != 5 or sorted(r.args[1]) != [3, 4]
                or sq.out_shapes[0] != (n, ho, wo, c)):
            continue
        pool = Node("MaxPool2d", [kh, kw], [node.inputs[0]], sq.outputs, [node.in_shapes[0]], sq.out_shapes,
                    node.in_dtypes, sq.out_dtypes)
        graph.nodes[graph.nodes.index(node)] = pool
        for dead in (t, r, sq):
            graph.nodes.remove(dead)
        count += 1
    return count


def squeeze_gathers(graph: Graph) -> None:
    """A ``Gather`` of single-element slices has MLX's output (*index, *slice) (rank 7 for a
    bilinear upsample of an NHWC image) and is followed by a ``Squeeze`` of the slice axes; the
    gather takes the squeezed shape itself, so no tensor above rank 5 is ever emitted."""
    readers = _readers(graph)
    for node in list(graph.nodes):
        if node.name != "Gather":
            continue
        chain = _single_consumer_chain(readers, node, ("Squeeze",))
        if chain is not None:
            sq = chain[1]
            node.outputs, node.out_shapes = sq.outputs, sq.out_shapes
            graph.nodes.remove(sq)


def _constant_names(graph: Graph) -> set:
    """Names whose values depend on constants only (weights, Arange/Full and what they feed)."""
    known = set(graph.constants)
    for node in graph.nodes:
        if all(i in known for i in node.inputs):
            known.update(node.outputs)
    return known


def unbroadcast_constants(graph: Graph) -> None:
    """An op that broadcasts its operands (:data:`BROADCASTING`: arithmetic, comparisons,
    ``Select``; and the added term of ``AddMM``) reading a ``Broadcast`` of a constant reads the
    constant itself when the operands still broadcast to the output shape (MIL broadcasts like
    numpy); otherwise the broadcast constant would be folded into a weight of the full activation
    size (a bias becoming batch x seq x width bytes in ``weight.bin``, once per function of a
    multifunction package since each function has its own sequence length)."""
    prod, const = graph.producers(), _constant_names(graph)
    for node in graph.nodes:
        slots = range(len(node.inputs)) if node.name in BROADCASTING else (2,) if node.name == "AddMM" else ()
        for i in slots:
            b = prod.get(node.inputs[i])
            if b is None or b.name != "Broadcast" or b.inputs[0] not in const:
                continue
            others = [node.out_shapes[0]] if node.name == "AddMM" else \
                [s for j, s in enumerate(node.in_shapes) if j != i]
            if tuple(np.broadcast_shapes(*map(tuple, others), tuple(b.in_shapes[0]))) == tuple(node.out_shapes[0]):
                node.inputs[i], node.in_shapes[i] = b.inputs[0], b.in_shapes[0]
