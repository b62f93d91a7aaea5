"""Every ``torch.distributed`` call of data-parallel training, as small functions over ranks.

With ``data_parallel`` on, each rank holds one slice of the batch; the *joined batch* is the
concatenation of the ranks' slices in rank order. These functions take a rank's local piece and
return the joined answer. With no process group (or one rank) each returns the single-process
answer, so callers need no branch. Only collectives of known size are used (``all_reduce`` and
``all_gather`` of tensors whose shape every rank computes alike), so the calls never exchange sizes.
"""

import os
from typing import Any

import torch
import torch.distributed as dist


def launched_ranks() -> int:
    """How many ranks ``torchrun`` started (its ``WORLD_SIZE``); 1 outside ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its machine (``torchrun``'s ``LOCAL_RANK``); 0 outside ``torchrun``."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def start_process_group(device: str) -> None:
    """Join ``torchrun``'s process group (environment rendezvous): NCCL for CUDA devices, each rank on
    ``cuda:LOCAL_RANK`` (NCCL's collectives use the current device), gloo otherwise."""
    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def end_process_group() -> None:
    """Leave the process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank is here (nothing without a process group)."""
    if world_size() > 1:
        dist.barrier()


def world_size() -> int:
    """The number of ranks of the default process group; 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 when none is initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sum_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``local`` over all ranks (a new tensor)."""
    total = local.clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def min_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum of ``local`` over all ranks (a new tensor)."""
    smallest = local.clone()
    if world_size() > 1:
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return smallest


def gather_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` stacked in rank order: ``[...] -> [world_size, ...]``; same shape on every rank."""
    if world_size() == 1:
        return local[None].clone()
    pieces = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(pieces, local.contiguous())
    return torch.stack(pieces)


def rank_0_value(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_over_ranks(name: str, value: int, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless ``value`` is the same on all ranks (one small gather on ``device``)."""
    if world_size() == 1:
        return
    values = gather_over_ranks(torch.tensor([value], dtype=torch.long, device=device)).flatten().tolist()
    if len(set(values)) > 1:
        raise ValueError(f"{name} must be the same on every rank for data-parallel training, got {values}")


@torch.no_grad()
def joined_boundaries(
    local_top: torch.Tensor, groups: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Each group's boundary among its ``m`` largest values over all ranks, and this rank's share of its ties.

    ``local_top [S]``: this rank's largest values of each group, group after group (``groups [S]``,
    non-decreasing group ids, the same on every rank; any order within a group): per group at
    least every value among its ``min(m_g, this rank's values of g)`` largest, padded with
    ``-inf``; the ranks together send at least ``m_g``. ``m [G]``: per group, how many values of the
    joined batch are taken. Returns ``(boundary [G], taken [G])``: the ``m_g``-th largest value of
    the joined batch (+inf where ``m_g`` is 0), and how many of this rank's values *equal* to it are
    taken (ties go to the lower rank, the joined batch's order). The joined selection's values on
    this rank are then its values above the boundary and its first ``taken`` values at it. Exact
    even where a rank's list cut a tie short: such a list is full, so what it sent already settles
    its rank's ties and leaves none to the ranks after it.

    Shorter lists may be sent: the third result says whether they *covered* the boundary, that is
    every rank sent all its values (it padded) or its smallest value sent lies below the boundary,
    so that no value at or above a boundary stayed behind; only then are the first two exact (a
    full list of ``min(m_g, n)`` values always is). The flag is read on the host, the same on every rank.
    """
    n_groups = m.shape[0]
    gathered = gather_over_ranks(local_top)  # [W, S]
    boundary = _group_boundaries(gathered, groups, m)  # [G]
    at = boundary[groups]
    above = _count_per_group(gathered > at, groups, n_groups)  # [W, G]
    tied = _count_per_group(gathered == at, groups, n_groups)
    still_needed = m - above.sum(0)
    tied_below = tied.cumsum(0) - tied  # ties held by lower ranks
    taken = (still_needed - tied_below).clamp(min=0).minimum(tied)
    padded = _count_per_group(gathered == -torch.inf, groups, n_groups) > 0
    smallest = torch.full_like(above, torch.inf, dtype=gathered.dtype)
    smallest.scatter_reduce_(1, groups.expand_as(gathered), gathered, "amin")
    covered = bool((padded | (smallest < boundary) | (m == 0)).all())
    return boundary, taken[rank() if gathered.shape[0] > 1 else 0], covered


def _group_boundaries(gathered: torch.Tensor, groups: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per group, its ``m_g``-th largest value over all ranks (+inf where ``m_g`` is 0). ``-> [G]``."""
    n_ranks, n_groups = gathered.shape[0], m.shape[0]
    values = gathered.t().reshape(-1)  # position-major: each group's values stay contiguous
    if values.numel() == 0:
        return values.new_full((n_groups,), torch.inf)
    if n_groups == 1:  # one order statistic, no sort
        found = values.kthvalue(max(values.numel() - int(m[0]) + 1, 1)).values[None]
    else:  # ordered by (group, value descending)
        ordered = values[_group_major_order(values, groups.repeat_interleave(n_ranks))]
        sizes = torch.bincount(groups, minlength=n_groups) * n_ranks
        at = (sizes.cumsum(0) - sizes + m - 1).clamp(min=0, max=values.numel() - 1)
        found = ordered[at]
    return torch.where(m > 0, found, torch.inf)


def _group_major_order(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The order of ``values [N]`` by group (``groups [N]``, ascending), then value, largest first.

    Values that float32 holds exactly (float32, float16, bfloat16) sort once, by an order-preserving
    integer key with the group in its high bits; wider ones (float64) by two stable sorts, since
    their float32 bits would tie values that differ below float32 resolution.
    """
    if values.dtype == torch.float64:
        by_value = values.argsort(descending=True, stable=True)
        return by_value[groups[by_value].argsort(stable=True)]
    bits = values.float().view(torch.int32).long()
    ascending = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order = float order
    return (groups * 2**33 - ascending).argsort()


def _count_per_group(flags: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per rank, how many flagged positions each group has: ``[W, S] -> [W, G]`` (long)."""
    counts = flags.new_zeros((flags.shape[0], n_groups), dtype=torch.long)
    return counts.index_add_(1, groups, flags.long())
