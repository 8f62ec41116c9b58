"""The one object that owns the split of COMM_WORLD (architecture.md §2), and the one rank -> role map..

Layout for alpha = 2, beta = 2 (world size 1 + 2 + 4 = 7):

    world rank   role        communicators
    0            client      (the control channel only)
    1, 2         CompNode    comp_comm ranks 0, 1; work_comm ranks 0, 1
    3, 4, 5, 6   AttnNode    attn_cart coords (0,0) (0,1) (1,0) (1,1); work_comm ranks 2 … 5

Row i of the AttnNode grid holds queries of index group i, column j keys/values of group j. Every rank also holds
its end of the control channel (dist/control.py) on a duplicate of the world, ranks as in the world: the client's
headers, each CompNode's inputs, the final rows and the ledgers.
"""
from __future__ import annotations

from dataclasses import dataclass

from rshard_hpc.dist.control import Channel
from rshard_hpc.errors import InputError


def world_size_for(alpha: int, beta: int) -> int:
    return 1 + alpha + beta * beta


def check_layout(alpha: int, beta: int, world_size: int) -> None:
    """Raise a clear InputError unless world_size == 1 + alpha + beta**2."""
    if alpha < 1 or beta < 1:
        raise InputError(f"alpha and beta must be >= 1 (got alpha={alpha}, beta={beta})")
    want = world_size_for(alpha, beta)
    if world_size != want:
        raise InputError(
            f"world size is {world_size}, but alpha={alpha}, beta={beta} needs "
            f"1 + alpha + beta^2 = 1 + {alpha} + {beta * beta} = {want} ranks "
            f"(run with mpiexec -n {want}, or change --alpha/--beta)"
        )


def layouts_for(world_size: int) -> list[tuple[int, int]]:
    """Every (alpha, beta) with 1 + alpha + beta^2 == world_size."""
    out, beta = [], 1
    while 1 + 1 + beta * beta <= world_size:
        out.append((world_size - 1 - beta * beta, beta))
        beta += 1
    return out


# ------------------------------------------------------------------------------------------ the rank -> role map
@dataclass(frozen=True)
class Node:
    """What one world rank is in a layout."""

    role: str  # "client" | "comp" | "attn"
    comp_index: int = -1  # CompNode index 0 … alpha-1
    attn_coords: tuple = (-1, -1)  # AttnNode (query group i, key group j)

    @property
    def name(self) -> str:
        """The plan-view name: 'client', 'comp1', 'attn0_2'."""
        if self.role == "comp":
            return f"comp{self.comp_index}"
        if self.role == "attn":
            return "attn{}_{}".format(*self.attn_coords)
        return "client"

    @property
    def label(self) -> str:
        """For people: 'client', 'CompNode 1', 'AttnNode (0, 2)'."""
        return node_label(self.name)


def node_at(rank: int, alpha: int, beta: int) -> Node:
    """The node world rank `rank` is: 0 the client, 1 … alpha the CompNodes, then the AttnNode grid row-major
    (Create_cart with reorder=False keeps that order)."""
    if rank == 0:
        return Node("client")
    if rank <= alpha:
        return Node("comp", comp_index=rank - 1)
    k = rank - 1 - alpha
    return Node("attn", attn_coords=(k // beta, k % beta))


def comp_world_rank(k: int) -> int:
    """The world rank of CompNode k (the inverse of node_at)."""
    return 1 + k


def attn_world_rank(i: int, j: int, alpha: int, beta: int) -> int:
    """The world rank of AttnNode (i, j) (the inverse of node_at)."""
    return 1 + alpha + i * beta + j


def comp_name(k: int) -> str:
    return Node("comp", comp_index=k).name


def attn_name(i: int, j: int) -> str:
    return Node("attn", attn_coords=(i, j)).name


def node_label(name: str) -> str:
    """'comp1' -> 'CompNode 1', 'attn0_2' -> 'AttnNode (0, 2)'."""
    if name.startswith("comp"):
        return f"CompNode {name[4:]}"
    if name.startswith("attn"):
        i, j = name[4:].split("_")
        return f"AttnNode ({i}, {j})"
    return name


def role_of(rank: int, alpha: int | None, beta: int | None, world_size: int) -> str:
    """The label of `rank` in the layout, or just "rank R" when no layout fits (rshard doctor)."""
    if alpha is None or beta is None or alpha < 1 or beta < 1 or world_size != world_size_for(alpha, beta):
        return f"rank {rank}"
    return node_at(rank, alpha, beta).label


def rank_layout(alpha: int, beta: int) -> list[dict]:
    """Which world rank is which node, for reports."""
    rows = []
    for rank in range(world_size_for(alpha, beta)):
        node = node_at(rank, alpha, beta)
        rows.append({"rank": rank, "node": node.name, "label": node.label})
    return rows


# ------------------------------------------------------------------------------------------ the communicators
@dataclass
class Topology:
    world: object  # MPI.Comm
    alpha: int
    beta: int
    node: Node  # what this rank is
    comp_comm: object  # CompNodes only (None elsewhere)
    attn_cart: object  # beta x beta Cartesian grid of AttnNodes (None elsewhere)
    work_comm: object  # CompNodes then AttnNodes (None on the client)
    channel: Channel  # the client's control channel, on a duplicate of world (dist/control.py)

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def role(self) -> str:
        return self.node.role

    @property
    def comp_index(self) -> int:
        return self.node.comp_index

    @property
    def attn_coords(self) -> tuple:
        return self.node.attn_coords

    @property
    def is_client(self) -> bool:
        return self.role == "client"

    def comp_work_rank(self, k: int) -> int:
        """work_comm rank of CompNode k (work_comm is the world without the client)."""
        return k

    def attn_work_rank(self, i: int, j: int) -> int:
        """work_comm rank of AttnNode (i, j)."""
        return attn_world_rank(i, j, self.alpha, self.beta) - 1

    def describe(self) -> str:
        return f"rank {self.rank} ({self.node.label})"

    @classmethod
    def build(cls, world, alpha: int, beta: int) -> "Topology":
        """Split `world`; every rank calls this. Raises InputError (on every rank) on a bad size."""
        check_layout(alpha, beta, world.Get_size())
        rank = world.Get_rank()
        node = node_at(rank, alpha, beta)
        role = node.role
        undefined = _undefined()
        comp_comm = world.Split(1 if role == "comp" else undefined, rank)
        attn_flat = world.Split(1 if role == "attn" else undefined, rank)
        work_comm = world.Split(1 if role != "client" else undefined, rank)
        attn_cart = None
        if role == "attn":
            attn_cart = attn_flat.Create_cart(dims=[beta, beta], periods=[False, False], reorder=False)
            assert tuple(attn_cart.Get_coords(attn_cart.Get_rank())) == node.attn_coords
            attn_flat.Free()
        comp_comm = comp_comm if role == "comp" else None
        work_comm = work_comm if role != "client" else None
        global _CURRENT
        _CURRENT = cls(world, alpha, beta, node, comp_comm, attn_cart, work_comm, Channel(world.Dup()))
        return _CURRENT


def _undefined():
    from mpi4py import MPI

    return MPI.UNDEFINED


_CURRENT = None


def current() -> "Topology":
    """The topology this process built (for error messages)."""
    if _CURRENT is None:
        raise RuntimeError("no topology yet")
    return _CURRENT
