"""The one object that owns the split of COMM_WORLD (DESIGN §2).

Layout for alpha = 2, beta = 2 (world size 1 + 2 + 4 = 7):

    world rank   role        communicators
    0            client      client_comm (rank 0)
    1, 2         CompNode    comp_comm ranks 0, 1; work_comm ranks 0, 1; client_comm ranks 1, 2
    3, 4, 5, 6   AttnNode    attn_cart coords (0,0) (0,1) (1,0) (1,1); work_comm ranks 2 … 5

Row i of the AttnNode grid holds queries of index group i, column j keys/values of group j.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class Topology:
    world: object  # MPI.Comm
    alpha: int
    beta: int
    role: str  # "client" | "comp" | "attn"
    comp_index: int  # CompNode index 0 … alpha-1, or -1
    attn_coords: tuple  # (query group i, key group j), or (-1, -1)
    comp_comm: object  # CompNodes only (None elsewhere)
    attn_cart: object  # beta x beta Cartesian grid of AttnNodes (None elsewhere)
    work_comm: object  # CompNodes then AttnNodes (None on the client)
    client_comm: object  # client + CompNodes (None on AttnNodes)

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def is_client(self) -> bool:
        return self.role == "client"

    def comp_work_rank(self, k: int) -> int:
        """work_comm rank of CompNode k."""
        return k

    def attn_work_rank(self, i: int, j: int) -> int:
        """work_comm rank of AttnNode (i, j)."""
        return self.alpha + i * self.beta + j

    def describe(self) -> str:
        if self.role == "client":
            return f"rank {self.rank} (client)"
        if self.role == "comp":
            return f"rank {self.rank} (CompNode {self.comp_index})"
        return f"rank {self.rank} (AttnNode {self.attn_coords})"

    @classmethod
    def build(cls, world, alpha: int, beta: int) -> "Topology":
        """Split `world`; every rank calls this. Raises InputError (on every rank) on a bad size."""
        check_layout(alpha, beta, world.Get_size())
        rank = world.Get_rank()
        if rank == 0:
            role = "client"
        elif rank <= alpha:
            role = "comp"
        else:
            role = "attn"
        undefined = _undefined()
        comp_comm = world.Split(1 if role == "comp" else undefined, rank)
        attn_flat = world.Split(1 if role == "attn" else undefined, rank)
        work_comm = world.Split(1 if role != "client" else undefined, rank)
        client_comm = world.Split(1 if role != "attn" else undefined, rank)
        attn_cart = None
        coords = (-1, -1)
        if role == "attn":
            attn_cart = attn_flat.Create_cart(dims=[beta, beta], periods=[False, False], reorder=False)
            coords = tuple(attn_cart.Get_coords(attn_cart.Get_rank()))
            attn_flat.Free()
            assert work_comm.Get_rank() == alpha + coords[0] * beta + coords[1]
        comp_comm = comp_comm if role == "comp" else None
        work_comm = work_comm if role != "client" else None
        client_comm = client_comm if role != "attn" else None
        global _CURRENT
        _CURRENT = cls(world, alpha, beta, role, rank - 1 if role == "comp" else -1, coords,
                       comp_comm, attn_cart, work_comm, client_comm)
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


def role_of(rank: int, alpha: int | None, beta: int | None, world_size: int) -> str:
    """The role `rank` has in the layout (DESIGN §2), or just "rank R" when no layout fits."""
    if alpha is None or beta is None or world_size != 1 + alpha + beta * beta or alpha < 1 or beta < 1:
        return f"rank {rank}"
    if rank == 0:
        return "client"
    if rank <= alpha:
        return f"CompNode {rank - 1}"
    k = rank - 1 - alpha
    return f"AttnNode ({k // beta}, {k % beta})"  # Create_cart(reorder=False) is row-major


def layouts_for(world_size: int) -> list[tuple[int, int]]:
    """Every (alpha, beta) with 1 + alpha + beta^2 == world_size."""
    out, beta = [], 1
    while 1 + 1 + beta * beta <= world_size:
        out.append((world_size - 1 - beta * beta, beta))
        beta += 1
    return out


def comp_name(k: int) -> str:
    return f"comp{k}"


def attn_name(i: int, j: int) -> str:
    return f"attn{i}_{j}"


# ------------------------------------------------------------------------------------------ names and layout
def node_label(name: str) -> str:
    """'comp1' -> 'CompNode 1', 'attn0_2' -> 'AttnNode (0, 2)'."""
    if name.startswith("comp"):
        return f"CompNode {name[4:]}"
    if name.startswith("attn"):
        i, j = name[4:].split("_")
        return f"AttnNode ({i}, {j})"
    return name


def rank_layout(alpha: int, beta: int) -> list[dict]:
    """Which world rank is which node (DESIGN §2, as Topology.build splits COMM_WORLD)."""
    rows = [{"rank": 0, "node": "client", "label": "client"}]
    rows += [{"rank": 1 + k, "node": comp_name(k), "label": node_label(comp_name(k))} for k in range(alpha)]
    for i in range(beta):
        for j in range(beta):
            name = attn_name(i, j)
            rows.append({"rank": 1 + alpha + i * beta + j, "node": name, "label": node_label(name)})
    return rows
