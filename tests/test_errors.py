"""Bad input: clear errors naming the argument; out-of-range ids are masked (checks off) or rejected (checks on)."""

import re

import pytest
import torch

import moe_ops
from moe_ops import MoEInputError, validation

T, H, K, E = 6, 8, 2, 4


def good() -> dict[str, torch.Tensor]:
    return dict(x=torch.randn(T, H), topk_idx=torch.randint(0, E, (T, K)), topk_weights=torch.rand(T, K))


def call(**changes: object) -> None:
    args = good() | {k: v for k, v in changes.items() if k in ("x", "topk_idx", "topk_weights")}
    kwargs = dict(num_experts=E) | {k: v for k, v in changes.items() if k not in args}
    torch.ops.moe.dispatch(args["x"], args["topk_idx"], args["topk_weights"], **kwargs)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(x=torch.randn(T, H, 1)), "x must be 2-D"),
        (dict(x=torch.randn(T)), "x must be 2-D"),
        (dict(x=torch.randint(0, 3, (T, H))), "x must have dtype"),
        (dict(topk_idx=torch.rand(T, K)), "topk_idx must have dtype"),
        (dict(topk_idx=torch.randint(0, E, (T,))), "topk_idx must be 2-D"),
        (dict(topk_weights=torch.rand(T, K).bfloat16()), "topk_weights must have dtype"),
        (dict(topk_idx=torch.randint(0, E, (T + 1, K)), topk_weights=torch.rand(T + 1, K)), "topk_idx has 7 rows but x has 6"),
        (dict(topk_weights=torch.rand(T, K + 1)), "topk_weights has shape (6, 3) but topk_idx has (6, 2)"),
        (dict(topk_idx=torch.zeros(T, 0, dtype=torch.int64), topk_weights=torch.zeros(T, 0)), "at least one column"),
        (dict(x=torch.randn(H, T).t()), "x must be contiguous"),
        (dict(topk_idx=torch.randint(0, E, (K, T)).t()), "topk_idx must be contiguous"),
        (dict(topk_idx=torch.randint(0, E, (T, K), device="meta")), "topk_idx is on meta but x is on cpu"),
        (dict(num_experts=0), "num_experts must be >= 1"),
        (dict(layout="dense"), "layout must be 'ragged' or 'padded'"),
        (dict(capacity=4), "capacity applies to layout='padded' only"),
        (dict(max_tokens_per_rank=6), "max_tokens_per_rank applies to layout='padded' and to max_recv_rows only"),
        (dict(layout="padded", max_recv_rows=8), "max_recv_rows bounds the ragged layout"),
        (dict(max_recv_rows=-1), "max_recv_rows must be >= 0"),
        (dict(max_recv_rows=10, pad_multiple=4), "max_recv_rows=10 must be a multiple of pad_multiple=4"),
        (dict(pad_multiple=0), "pad_multiple must be an int >= 1"),
        (dict(group_size=3), "group_size=3, but group '' has 1 ranks"),
        (dict(layout="padded", capacity=-3), "capacity must be >= 0"),
        (dict(layout="padded", max_tokens_per_rank=T - 1), "x has 6 tokens, more than max_tokens_per_rank=5"),
        (dict(backend="nccl-magic"), "unknown backend 'nccl-magic'"),
    ],
)
def test_dispatch_metadata(changes: dict[str, object], message: str) -> None:
    with pytest.raises(MoEInputError, match=re.escape(message)):
        call(**changes)


def test_experts_not_divisible_by_group() -> None:
    g = good()
    with pytest.raises(MoEInputError, match="num_experts=4 is not divisible by the group size 3"):
        validation.check_dispatch(g["x"], g["topk_idx"], g["topk_weights"], 4, 3, "ragged", None, None)


def test_combine_metadata() -> None:
    d = moe_ops.dispatch(**good(), num_experts=E)
    n = d.recv_x.shape[0]
    with pytest.raises(MoEInputError, match=re.escape(f"expert_out has shape ({n + 1}, 8), expected leading dims ({n},)")):
        torch.ops.moe.combine(torch.randn(n + 1, H), d.recv_weights, d.handle)
    with pytest.raises(MoEInputError, match="recv_weights has shape"):
        torch.ops.moe.combine(d.recv_x, d.recv_weights[:-1], d.handle)
    with pytest.raises(MoEInputError, match="handle must be the list of tensors moe.dispatch returned"):
        torch.ops.moe.combine(d.recv_x, d.recv_weights, d.handle[:1])
    with pytest.raises(MoEInputError, match="handle must be the 3 tensors moe.dispatch returned for backend 'local'"):
        torch.ops.moe.combine(d.recv_x, d.recv_weights, [*d.handle, d.handle[1]])
    with pytest.raises(MoEInputError, match=re.escape(f"expert_out has shape ({n * H},), expected leading dims ({n},) then 1 more")):
        torch.ops.moe.combine(d.recv_x.reshape(-1), d.recv_weights, d.handle)
    with pytest.raises(MoEInputError, match="recv_weights must have dtype"):
        torch.ops.moe.combine(d.recv_x, d.recv_weights.half(), d.handle)
    padded = moe_ops.dispatch(**good(), num_experts=E, layout="padded", capacity=2)
    with pytest.raises(MoEInputError, match="expected leading dims"):
        torch.ops.moe.combine(padded.recv_x, padded.recv_weights, d.handle)


JUNK_IDS = [E, E + 1, 2**40, -2, -(2**31), 2**31 - 1]


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_out_of_range_ids_are_masked_when_unchecked(device: str, layout: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(len(JUNK_IDS), H, device=device)
    junk = torch.tensor(JUNK_IDS, device=device).unsqueeze(1)
    good_ids = torch.arange(len(JUNK_IDS), device=device).remainder(E).unsqueeze(1)
    w = torch.rand(len(JUNK_IDS), 2, device=device)
    kw = dict(layout="padded", capacity=3) if layout == "padded" else {}
    a = moe_ops.dispatch(x, torch.cat([junk, good_ids], 1), w, E, zero_padding=True, **kw)
    b = moe_ops.dispatch(x, torch.cat([torch.full_like(junk, -1), good_ids], 1), w, E, zero_padding=True, **kw)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and torch.equal(a.recv_x, b.recv_x)
    assert torch.equal(moe_ops.combine(a.recv_x, a), moe_ops.combine(b.recv_x, b))


@pytest.mark.parametrize(
    "idx, weights, message, unchecked_counts",
    [
        ([[0, 4]], [[0.5, 0.5]], "topk_idx holds id 4, outside [0, 4) and not -1", [1, 0, 0, 0]),
        ([[-2, 1]], [[0.5, 0.5]], "topk_idx holds id -2", [0, 1, 0, 0]),
        ([[1, 1]], [[0.5, 0.5]], "duplicate expert id within one row", [0, 2, 0, 0]),
        ([[1, 2]], [[float("nan"), 0.5]], "topk_weights holds NaN", [0, 1, 1, 0]),
    ],
)
def test_value_checks(idx: list[list[int]], weights: list[list[float]], message: str, unchecked_counts: list[int]) -> None:
    """Checks on: a clear error. Checks off: the call runs, out-of-range ids act as masked routes, a
    repeated id is two routes and a NaN weight is carried as it is."""
    x, idx_t, w = torch.randn(1, H), torch.tensor(idx), torch.tensor(weights)
    with moe_ops.config.value_checks(True):
        with pytest.raises(MoEInputError, match=re.escape(message)):
            moe_ops.dispatch(x, idx_t, w, E)
    d = moe_ops.dispatch(x, idx_t, w, E)
    assert d.tokens_per_expert.tolist() == unchecked_counts
    kept = [(e, weight) for e, weight in zip(idx[0], weights[0], strict=True) if 0 <= e < E]
    expected_weights = torch.tensor([weight for _, weight in sorted(kept, key=lambda route: route[0])])
    torch.testing.assert_close(d.recv_weights, expected_weights, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(d.recv_x, x.expand(len(kept), H))


def test_value_checks_accept_masked_routes() -> None:
    """-1 is the one out-of-range id the checks accept: a masked route, no row."""
    x = torch.randn(2, H)
    with moe_ops.config.value_checks(True):
        d = moe_ops.dispatch(x, torch.tensor([[-1, -1], [3, -1]]), torch.tensor([[0.1, 0.2], [0.3, 0.4]]), E)
    assert d.tokens_per_expert.tolist() == [0, 0, 0, 1] and torch.equal(d.recv_x, x[1:])
    assert d.recv_weights.tolist() == pytest.approx([0.3])


def test_placement_metadata() -> None:
    g = good()
    with pytest.raises(MoEInputError, match=re.escape("expert_map has shape (2, 4), expected (group size, num_experts) = (1, 4)")):
        moe_ops.dispatch(**g, num_experts=E, expert_map=torch.zeros(2, E, dtype=torch.int64))
    with pytest.raises(MoEInputError, match="log2phy must be 1-D"):
        moe_ops.dispatch(**g, num_experts=E, log2phy=torch.zeros(2, E, dtype=torch.int64))
    with pytest.raises(MoEInputError, match="expert_map must have dtype"):
        moe_ops.dispatch(**g, num_experts=E, expert_map=torch.zeros(1, E))


@pytest.mark.parametrize(
    "expert_map, log2phy, message",
    [
        ([[0, 1, 2, 4]], None, "expert_map holds a local id outside [-1, 4)"),
        (None, [0, 4], "log2phy holds a physical id outside [0, 4)"),
    ],
)
def test_placement_values(expert_map: list | None, log2phy: list | None, message: str) -> None:
    kw = dict(
        expert_map=None if expert_map is None else torch.tensor(expert_map),
        log2phy=None if log2phy is None else torch.tensor(log2phy),
    )
    x, idx, w = torch.randn(2, H), torch.tensor([[0, -1], [1, -1]]), torch.rand(2, 2)
    with moe_ops.config.value_checks(True):
        with pytest.raises(MoEInputError, match=re.escape(message)):
            moe_ops.dispatch(x, idx, w, E, **kw)


@pytest.mark.parametrize("backend", ["collective", "allgather"])
def test_a_transport_without_its_group_is_refused(backend: str) -> None:
    """Without group_name a transport would run on torch's default group (or fail inside torch)."""
    x, idx, w = torch.randn(4, 8), torch.tensor([[0, 1]] * 4), torch.rand(4, 2)
    with pytest.raises(MoEInputError, match=f"backend '{backend}' moves tokens between the ranks of a process group"):
        moe_ops.dispatch(x, idx, w, 4, backend=backend, layout="padded", max_tokens_per_rank=4)


@pytest.mark.multiproc
def test_combine_without_the_dispatchs_group_is_refused(worlds) -> None:
    assert worlds(1).run(_combine_without_group) == ["refused"]


def _combine_without_group(rank: int) -> str:
    import torch.distributed as dist

    x, idx, w = torch.randn(4, 8), torch.tensor([[0, 1]] * 4), torch.rand(4, 2)
    d = moe_ops.dispatch(x, idx, w, 4, group=dist.group.WORLD, backend="collective")
    try:
        moe_ops.combine(d.recv_x, d)  # the dispatch's group not passed
    except MoEInputError as error:
        return "refused" if "no group_name was given" in str(error) else str(error)
    return "ran"
