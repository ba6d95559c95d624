"""Operator fusion by TVM's four classes.

* injective ops fuse with each other into one loop nest (a chain of elementwise ops, a transpose
  after an add, ...);
* complex-out-fusable ops (conv2d, matmul) take the elementwise ops that follow them as an
  epilogue computed from the accumulator registers;
* reductions (softmax, layer norm, pooling) take injective producers as a prologue and
  elementwise consumers as an epilogue;
* opaque ops (embedding gathers) fuse with nothing.

A producer fuses into its consumer only when the consumer is its only user and it is not a graph
output. Each group becomes one FUSED node whose ``body`` is a sub-graph (INPUT nodes for the
group's external inputs, then the members); reshapes stay views (no kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.compiler.ir import ELEMENTWISE, Graph, GraphBuilder, Node, Op, OpKind


@dataclass
class Group:
    members: list[int]
    anchor: OpKind  # INJECTIVE for a group of injective ops only
    closed: bool = False
    ops: list[str] = field(default_factory=list)

    @property
    def out(self) -> int:
        return self.members[-1]


def fusion_groups(graph: Graph) -> list[Group]:
    """Decide the groups (pure; exposed for tests)."""
    users = graph.users()
    outputs = set(graph.outputs)
    group_of: dict[int, Group] = {}
    groups: list[Group] = []

    def fusable_producer(p: int, i: int) -> Group | None:
        g = group_of.get(p)
        if g is None or g.closed or g.out != p or users[p] != [i] or p in outputs:
            return None
        return g

    for i, n in enumerate(graph.nodes):
        if n.op in (Op.INPUT, Op.CONST):
            continue
        if n.op is Op.RESHAPE and i not in outputs:
            continue  # a view of its input
        g: Group | None = None
        if n.kind is OpKind.INJECTIVE and n.inputs:
            for p in n.inputs:
                cand = fusable_producer(p, i)
                if cand is None:
                    continue
                if cand.anchor is OpKind.INJECTIVE or ((n.op in ELEMENTWISE or n.op is Op.BATCH_NORM)
                                                       and n.shape == graph.nodes[p].shape):
                    g = cand
                    break
        if g is not None:
            g.members.append(i)
        elif n.kind is OpKind.REDUCTION and n.inputs and (pro := fusable_producer(n.inputs[0], i)) is not None \
                and pro.anchor is OpKind.INJECTIVE:
            g = pro
            g.members.append(i)
            g.anchor = OpKind.REDUCTION
        else:
            g = Group([i], n.kind, closed=n.kind is OpKind.OPAQUE)
            groups.append(g)
        group_of[i] = g
    for g in groups:
        g.ops = [graph.nodes[m].op.value for m in g.members]
    return groups


def fuse_operators(graph: Graph) -> Graph:
    groups = {g.out: g for g in fusion_groups(graph)}
    in_group = {m for g in groups.values() for m in g.members}
    b = GraphBuilder(graph.consts)
    remap: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if i in groups:
            g = groups[i]
            members = set(g.members)
            ext: list[int] = []
            for m in g.members:
                for j in graph.nodes[m].inputs:
                    if j not in members and j not in ext:
                        ext.append(j)
            body = GraphBuilder()
            local = {j: body.input(graph.nodes[j].shape, graph.nodes[j].dtype, f"in{k}") for k, j in enumerate(ext)}
            for m in g.members:
                mn = graph.nodes[m]
                local[m] = body.add(Node(mn.op, tuple(local[j] for j in mn.inputs), mn.shape, mn.dtype, dict(mn.attrs), mn.name))
            attrs = {"body": body.build([local[g.out]]), "kind": g.anchor.value, "label": "+".join(g.ops)}
            remap[i] = b.add(Node(Op.FUSED, tuple(remap[j] for j in ext), n.shape, n.dtype, attrs, n.name))
        elif i in in_group:
            continue
        else:
            new = b.add(Node(n.op, tuple(remap[j] for j in n.inputs), n.shape, n.dtype, dict(n.attrs), n.name))
            if n.op is Op.INPUT:
                b.inputs.append(new)
            remap[i] = new
    return Graph(tuple(b.nodes), tuple(remap[i] for i in graph.inputs), tuple(remap[o] for o in graph.outputs),
                 b.consts, dict(graph.meta))
