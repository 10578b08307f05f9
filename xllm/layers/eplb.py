"""Expert placement for expert parallelism, and the load balancer that computes it (EPLB).

A mixture-of-experts layer's E *logical* experts become P >= E *physical* experts (P - E
redundant replicas of popular experts), P / N of them on each of the N ranks: rank r holds
physical experts ``[r * P / N, (r + 1) * P / N)``. ``phy2log[l, p]`` names the logical
expert behind physical expert p in MoE layer l. A token routed to logical expert e goes to
one of e's replicas, chosen by its row in the batch (``row % count[e]``), so every rank
computes the same choice without talking and e's load spreads over its replicas.

``rebalance_experts`` computes a placement from measured per-expert loads in the manner of
DeepSeek's EPLB (hierarchical): expert groups are packed onto nodes so nodes carry equal
load, then each node's experts are replicated (each new replica goes to the expert with the
highest load per replica), then the physical experts are packed onto the node's ranks so the
ranks carry equal load. ``rank_loads`` gives the load each rank would carry. Numpy, on the
control path (once per rebalance); nothing here runs per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Placement", "balanced_packing", "rank_experts", "rank_loads", "rebalance_experts",
           "replica_table", "replicate_experts", "static_placement"]


def replica_table(row: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy [E, max replicas] with -1 padding, count [E]) of one layer's
    physical-to-logical ``row``; a logical expert's replicas in ascending physical order."""
    count = np.bincount(row, minlength=num_experts)
    table = np.full((num_experts, int(count.max())), -1, dtype=np.int64)
    order = np.argsort(row, kind="stable")
    starts = np.cumsum(count) - count
    table[row[order], np.arange(len(row)) - starts[row[order]]] = order
    return table, count


def rank_experts(row: np.ndarray, num_ranks: int, rank: int) -> np.ndarray:
    """The logical experts rank ``rank`` holds under one layer's physical-to-logical
    ``row`` (unique, sorted): those its physical slots, the rank's P / N, name."""
    per = len(row) // num_ranks
    return np.unique(row[rank * per:(rank + 1) * per])


@dataclass(frozen=True)
class Placement:
    """Where every MoE layer's experts live: ``phy2log [L, P]`` over ``num_ranks`` ranks."""

    phy2log: np.ndarray  # int64 [num_moe_layers, num_physical]
    num_experts: int
    num_ranks: int

    def __post_init__(self) -> None:
        p = self.phy2log
        if p.ndim != 2 or p.shape[1] % self.num_ranks or p.shape[1] < self.num_experts:
            raise ValueError(f"phy2log {p.shape} must be [layers, P] with P >= "
                             f"{self.num_experts} experts and a multiple of {self.num_ranks} "
                             "ranks")
        if p.size and (p.min() < 0 or p.max() >= self.num_experts):
            raise ValueError(f"phy2log must name experts in [0, {self.num_experts})")
        for layer in p:
            if len(np.unique(layer)) != self.num_experts:
                raise ValueError("every logical expert needs at least one physical replica")

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def replicas(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """``replica_table`` of MoE layer ``layer``."""
        return replica_table(self.phy2log[layer], self.num_experts)


def static_placement(num_layers: int, num_experts: int, num_ranks: int,
                     num_redundant: int = 0) -> Placement:
    """Experts in order, E / N a rank (as even as P allows), the redundant slots replicating
    experts 0, 1, ... until a first rebalance knows better."""
    physical = num_experts + num_redundant
    if physical % num_ranks:
        raise ValueError(f"{num_experts} experts + {num_redundant} redundant must split evenly "
                         f"over {num_ranks} ranks; use a num_redundant_experts that makes "
                         f"their sum a multiple of {num_ranks}")
    row = np.concatenate([np.arange(num_experts), np.arange(num_redundant) % num_experts])
    return Placement(np.tile(row, (num_layers, 1)).astype(np.int64), num_experts, num_ranks)


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """(pack [L, n], rank within the pack [L, n]) putting n weighted items per row into
    ``num_packs`` packs of n / num_packs items each: heaviest first, each into the lightest
    pack that has room."""
    layers, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    per = n // num_packs
    pack = np.empty((layers, n), dtype=np.int64)
    rank = np.empty((layers, n), dtype=np.int64)
    if per == 1:
        pack[:] = np.arange(n)
        rank[:] = 0
        return pack, rank
    for i in range(layers):
        loads = np.zeros(num_packs)
        items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_packs = np.flatnonzero(items < per)
            p = open_packs[np.argmin(loads[open_packs])]
            pack[i, item], rank[i, item] = p, items[p]
            loads[p] += weight[i, item]
            items[p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_physical: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log [L, P], replica index [L, P], count [L, E]): every expert once, then each
    extra replica to the expert whose load per replica is highest."""
    layers, experts = weight.shape
    if num_physical < experts:
        raise ValueError(f"{num_physical} physical experts cannot hold {experts} experts")
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (layers, 1))
    replica = np.zeros((layers, num_physical), dtype=np.int64)
    count = np.ones((layers, experts), dtype=np.int64)
    rows = np.arange(layers)
    for p in range(experts, num_physical):
        best = np.argmax(weight / count, axis=1)
        phy2log[:, p] = best
        replica[:, p] = count[rows, best]
        count[rows, best] += 1
    return phy2log, replica, count


def rebalance_experts(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                      num_ranks: int) -> Placement:
    """A placement for per-layer expert loads ``load [L, E]`` (tokens routed to each
    logical expert): hierarchical when the expert groups split over the nodes (groups to
    nodes, replicas within nodes, physical experts to ranks), else the same with one group
    and one node."""
    load = np.asarray(load, dtype=np.float64)
    layers, experts = load.shape
    if experts % num_groups or num_groups % num_nodes:
        num_groups = num_nodes = 1
    if num_ranks % num_nodes or num_physical % num_ranks or num_physical < experts:
        raise ValueError(f"{num_physical} physical experts must be >= {experts} and split "
                         f"over {num_ranks} ranks on {num_nodes} nodes")
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    per_rank = num_physical // num_ranks
    per_node_log = experts // num_nodes
    per_node_phy = num_physical // num_nodes

    # 1. Groups to nodes; "node-major" logical ids (mlog): node n holds mlog
    #    [n * per_node_log, (n + 1) * per_node_log).
    group_load = load.reshape(layers, num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    first = (gpack * groups_per_node + grank) * group_size  # [L, groups]
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(layers, experts)
    mlog2log = np.argsort(log2mlog, axis=1)

    # 2. Replicas within each node, from its experts' loads.
    node_load = np.take_along_axis(load, mlog2log, 1).reshape(layers * num_nodes, per_node_log)
    phy2mlog, _, mcount = replicate_experts(node_load, per_node_phy)

    # 3. Physical experts to the node's ranks, each replica carrying load / count.
    phy_load = np.take_along_axis(node_load / mcount, phy2mlog, 1)
    pack, rank = balanced_packing(phy_load, num_ranks // num_nodes)
    slot = pack * per_rank + rank  # position within the node
    order = np.argsort(slot, axis=1)
    node_phy2mlog = np.take_along_axis(phy2mlog, order, 1).reshape(layers, num_nodes,
                                                                    per_node_phy)
    node_phy2mlog = node_phy2mlog + (np.arange(num_nodes) * per_node_log)[None, :, None]
    phy2log = np.take_along_axis(mlog2log, node_phy2mlog.reshape(layers, num_physical), 1)
    return Placement(phy2log.astype(np.int64), experts, num_ranks)


def rank_loads(load: np.ndarray, placement: Placement) -> np.ndarray:
    """[L, N]: the load each rank carries when each logical expert's load splits evenly over
    its replicas (as the row-based replica choice spreads it)."""
    load = np.asarray(load, dtype=np.float64)
    p = placement.phy2log
    count = np.stack([np.bincount(row, minlength=placement.num_experts) for row in p])
    per_phy = np.take_along_axis(load / count, p, 1)
    return per_phy.reshape(p.shape[0], placement.num_ranks, placement.per_rank).sum(-1)
