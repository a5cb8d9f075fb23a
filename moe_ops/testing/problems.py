"""Routing problems over a simulated world, and a Hypothesis strategy that draws them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import Tensor

from moe_ops.packing import round_up

PATTERNS = ("uniform", "one_expert", "one_rank", "sparse", "all_masked")
HIDDEN_SIZES = (1, 7, 64, 128, 1000)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Problem:
    """One dispatch/combine call on every rank of a simulated world (index = rank)."""

    xs: list[Tensor]
    topk_idx: list[Tensor]
    topk_weights: list[Tensor]
    num_experts: int
    layout: str = "ragged"
    capacity: int | None = None
    max_tokens_per_rank: int | None = None
    expert_map: Tensor | None = None  #: [W, E]: rank r's local id of each expert, -1 where absent
    log2phy: Tensor | None = None  #: [E_logical]: physical expert of each logical id
    description: str = field(default="", compare=False)
    max_recv_rows: int | None = None  #: ragged layout in a static [R, H] (the "bounded" kind)
    pad_multiple: int = 1  #: each expert's rows rounded up to a multiple of this (padded: the capacity)

    @property
    def kind(self) -> str:
        """The row layout dispatch returns: ``"ragged"``, ``"bounded"`` or ``"padded"``."""
        return "padded" if self.layout == "padded" else "ragged" if self.max_recv_rows is None else "bounded"

    @property
    def world_size(self) -> int:
        return len(self.xs)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def reference_capacity(self) -> int | None:
        """The capacity the reference uses: ``None`` for ragged, the resolved ``C`` for padded."""
        if self.layout == "ragged":
            return None
        bound = self.max_tokens_per_rank if self.max_tokens_per_rank is not None else self.xs[0].shape[0]
        capacity = self.world_size * bound if self.capacity is None else self.capacity
        return -(-capacity // self.pad_multiple) * self.pad_multiple

    def layout_kwargs(self) -> dict[str, object]:
        """The layout options of this problem, as ``moe_ops.dispatch`` and the ops take them."""
        return dict(layout=self.layout, capacity=self.capacity, max_tokens_per_rank=self.max_tokens_per_rank,
                    max_recv_rows=self.max_recv_rows, pad_multiple=self.pad_multiple)

    def dispatch_kwargs(self, device: torch.device | str = "cpu") -> dict[str, object]:
        """``moe_ops.dispatch``'s keyword arguments of this problem, placement tensors on ``device``."""
        return dict(
            self.layout_kwargs(),
            expert_map=None if self.expert_map is None else self.expert_map.to(device),
            log2phy=None if self.log2phy is None else self.log2phy.to(device),
        )

    def local_expert_ids(self, rank: int) -> Tensor:
        """``[L]``: the physical id of each of ``rank``'s local experts (-1 where it holds none)."""
        from moe_ops.reference import placement

        ids = torch.full((self.num_local_experts,), -1, dtype=torch.int64)
        for e, (r, j) in enumerate(placement(self.num_experts, self.world_size, self.expert_map)):
            if r == rank:
                ids[j] = e
        return ids


def padded(max_tokens_per_rank: int, capacity: int | None = None) -> dict[str, object]:
    """The keyword arguments of a padded layout (for :func:`make_problem` and ``moe_ops.dispatch``)."""
    return dict(layout="padded", max_tokens_per_rank=max_tokens_per_rank, capacity=capacity)


def _routes(gen: torch.Generator, tokens: int, top_k: int, experts: list[int]) -> Tensor:
    """``[tokens, top_k]`` distinct ids drawn from ``experts`` per row (``-1`` where fewer than ``top_k``)."""
    pool = torch.tensor(experts, dtype=torch.int64)
    take = min(top_k, len(experts))
    order = torch.rand(tokens, len(experts), generator=gen).argsort(dim=1)[:, :take]
    ids = pool[order]
    return torch.cat([ids, ids.new_full((tokens, top_k - take), -1)], dim=1)


def make_problem(
    tokens: list[int],
    hidden: int,
    num_experts: int,
    top_k: int,
    *,
    pattern: str = "uniform",
    mask_fraction: float = 0.0,
    out_of_range: bool = False,
    dtype: torch.dtype = torch.float32,
    id_dtype: torch.dtype = torch.int64,
    layout: str = "ragged",
    capacity: int | None = None,
    max_tokens_per_rank: int | None = None,
    max_recv_rows: int | None = None,
    pad_multiple: int = 1,
    shuffled: bool = False,
    logical_experts: int | None = None,
    seed: int = 0,
) -> Problem:
    """Build a problem deterministically from ``seed``. ``pattern`` picks the experts routes may use:
    ``uniform`` all; ``one_expert`` expert 0 only; ``one_rank`` the last rank's; ``sparse`` a few;
    ``all_masked`` none. ``out_of_range`` replaces some ids by values outside ``[0, E)`` (they act as masked).
    ``shuffled`` places the experts by a random ``expert_map``; ``logical_experts`` routes over that many
    logical ids mapped to distinct physical experts by a random ``log2phy``."""
    gen = torch.Generator().manual_seed(seed)
    world = len(tokens)
    num_local = num_experts // world
    expert_map = log2phy = None
    if shuffled:
        slots = torch.randperm(num_experts, generator=gen)  # slot r*L + j holds expert slots[r*L + j]
        expert_map = torch.full((world, num_experts), -1, dtype=torch.int64)
        for slot, e in enumerate(slots.tolist()):
            expert_map[slot // num_local, e] = slot % num_local
    if logical_experts is not None:
        log2phy = torch.randperm(num_experts, generator=gen)[:logical_experts]
    id_space = num_experts if logical_experts is None else logical_experts
    experts = {
        "uniform": list(range(id_space)),
        "one_expert": [0],
        "one_rank": list(range(max(0, id_space - num_local), id_space)),
        "sparse": sorted(torch.randperm(id_space, generator=gen)[: max(1, id_space // 8)].tolist()),
        "all_masked": [],
    }[pattern]
    xs, idx, weights = [], [], []
    for t in tokens:
        ids = _routes(gen, t, top_k, experts)
        ids[torch.rand(t, top_k, generator=gen) < mask_fraction] = -1
        if out_of_range:
            bad = torch.rand(t, top_k, generator=gen) < 0.1
            wide = [2**40, -(2**40)] if id_dtype == torch.int64 else [2**31 - 1, -(2**31)]
            junk = torch.tensor([id_space, id_space + 7, -2, -1000, *wide], dtype=torch.int64)
            ids[bad] = junk[torch.randint(0, len(junk), (t, top_k), generator=gen)][bad]
        xs.append(torch.randn(t, hidden, generator=gen).to(dtype))
        idx.append(ids.to(id_dtype))
        weights.append(torch.rand(t, top_k, generator=gen))
    description = (
        f"T={tokens} H={hidden} E={num_experts} K={top_k} {pattern} mask={mask_fraction} oor={out_of_range} "
        f"{dtype} {id_dtype} {layout} C={capacity} Tmax={max_tokens_per_rank} R={max_recv_rows} m={pad_multiple} "
        f"shuffled={shuffled} logical={logical_experts} seed={seed}"
    )
    return Problem(
        xs, idx, weights, num_experts, layout, capacity, max_tokens_per_rank, expert_map, log2phy, description,
        max_recv_rows=max_recv_rows, pad_multiple=pad_multiple,
    )


@st.composite
def problems(
    draw: st.DrawFn,
    world_size: int,
    *,
    max_tokens: int = 512,
    max_experts: int = 256,
    hidden_sizes: tuple[int, ...] = HIDDEN_SIZES,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    layouts: tuple[str, ...] = ("ragged", "padded", "bounded"),
    pad_multiples: tuple[int, ...] = (1, 1, 2, 8),
    out_of_range: bool = True,
    placements: tuple[str, ...] = ("contiguous", "contiguous", "shuffled", "redundant"),
    bound_multiple: int = 1,
) -> Problem:
    """Draw a :class:`Problem` for ``world_size`` ranks: uneven token counts (0 included), K = 1…8,
    E up to ``max_experts``, masked and out-of-range ids, every routing pattern, the given layouts
    (``"bounded"``: ragged with ``max_recv_rows`` from 0 to past the worst case), per-expert row multiples
    and expert placements (contiguous, shuffled by an ``expert_map``, redundant through a ``log2phy``);
    a static layout's ``max_tokens_per_rank`` is a multiple of ``bound_multiple``."""
    num_local = draw(st.integers(1, max(1, max_experts // world_size)))
    num_experts = num_local * world_size
    placement = draw(st.sampled_from(placements))
    logical = draw(st.integers(1, num_experts)) if placement == "redundant" else None
    top_k = draw(st.integers(1, min(8, logical or num_experts)))
    tokens = draw(st.lists(st.integers(0, max_tokens), min_size=world_size, max_size=world_size))
    kind = draw(st.sampled_from(layouts))
    pad_multiple = draw(st.sampled_from(pad_multiples))
    capacity = max_tokens_per_rank = max_recv_rows = None
    if kind != "ragged":
        max_tokens_per_rank = round_up(max(tokens) + draw(st.integers(0, 3)), bound_multiple)
    if kind == "padded":
        capacity = draw(st.one_of(st.none(), st.integers(0, 6)))
    if kind == "bounded":  # from none to more than every route this rank can receive, in pad_multiple's groups
        worst = world_size * max_tokens_per_rank * top_k + num_local * pad_multiple
        fraction = draw(st.sampled_from((0.0, 0.1, 0.5, 1.0, 1.2)))
        max_recv_rows = -(-int(fraction * worst) // pad_multiple) * pad_multiple
    return make_problem(
        tokens,
        draw(st.sampled_from(hidden_sizes)),
        num_experts,
        top_k,
        pattern=draw(st.sampled_from(PATTERNS)),
        mask_fraction=draw(st.sampled_from((0.0, 0.0, 0.3))),
        out_of_range=out_of_range and draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        id_dtype=draw(st.sampled_from((torch.int32, torch.int64))),
        layout="padded" if kind == "padded" else "ragged",
        capacity=capacity,
        max_tokens_per_rank=max_tokens_per_rank,
        max_recv_rows=max_recv_rows,
        pad_multiple=pad_multiple,
        shuffled=placement != "contiguous",
        logical_experts=logical,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
