"""Quantized dispatch (``moe.dispatch_quantized``, docs/contract.md "Quantized dispatch").

* The rounding (:func:`moe_ops.quant.quantize`) against a float64 reading of its definition, Hypothesis
  over shapes, dtypes, modes and magnitudes (zero rows, subnormal ranges, H not a multiple of 128).
* Rows and scales exact against the reference (moe_ops.testing.quantized): the local backend in plain
  torch (Hypothesis, every layout), the Triton kernels interpreted (bit-equal to plain torch, both
  dispatch paths, the row quantizer), ``collective`` and ``allgather`` over gloo at W = 2, 3.
* Errors, the refusal of a gradient to ``x``, opcheck and ``fullgraph`` compilation.

* On a GPU (``cuda`` marks; not in CI): the Triton kernels compiled, bit-equal to plain torch, and a
  padded quantized dispatch captured in a CUDA graph.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ops
from moe_ops import MoEInputError, ops, quant
from moe_ops.testing import quantized
from moe_ops.testing.problems import Problem, make_problem, problems

SPECS = [quant.QuantSpec(mode, block, rounded) for mode in ("fp8_e4m3", "int8") for block in (128, 0) for rounded in (False, True)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --- the rounding -----------------------------------------------------------------------------------


def _grid_step(v: torch.Tensor, spec: quant.QuantSpec) -> torch.Tensor:
    """The spacing of the format's values around ``|v|`` (float64): 1 for int8; e4m3: 2**(e - 3) for
    ``|v|`` in [2**e, 2**(e+1)), subnormal spacing 2**-9 below 2**-6."""
    if spec.dtype == torch.int8:
        return torch.ones_like(v)
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    return torch.exp2(exponent - 3)


@settings(max_examples=150)
@given(
    tokens=st.integers(0, 9), hidden=st.sampled_from((1, 7, 128, 200, 384)), dtype=st.sampled_from(DTYPES),
    spec=st.sampled_from(SPECS), magnitude=st.sampled_from((1e-30, 1e-6, 1e-2, 1.0, 1e3)), seed=st.integers(0, 2**31 - 1),
)
def test_quantize_matches_its_definition(tokens: int, hidden: int, dtype: torch.dtype, spec: quant.QuantSpec, magnitude: float,
                                        seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=gen) * magnitude).to(dtype)
    if tokens:
        x[0] = 0  # an all-zero row: the floor's scale
    q, s = quant.quantize(x, spec)
    assert q.dtype == spec.dtype and s.dtype == torch.float32
    columns = 1 if spec.block == 0 else math.ceil(hidden / 128)
    assert s.shape == (tokens, columns)
    # the scales: amax (exact) over each group, floored; then as the definition says, each step rounded once
    x64 = x.double()
    group = hidden if spec.block == 0 else 128
    padded = torch.nn.functional.pad(x64.abs(), (0, columns * group - hidden)).view(tokens, columns, group)
    amax = padded.amax(-1).clamp(min=quant.AMAX_FLOOR).float().double()
    product = amax * torch.tensor(1 / spec.qmax, dtype=torch.float32).double()  # exact in float64
    if spec.round_scale:
        assert torch.equal(torch.exp2(torch.ceil(torch.log2(s.double()))), s.double()), "scales must be powers of two"
        rounded = product.float().double()  # the product in float32, whose next power of two is the scale
        assert bool((s.double() >= rounded).all() and (s.double() < 2 * rounded).all())
        factor = 1 / s.double()
    else:
        factor = (spec.qmax / amax).float().double()  # QMAX / amax, rounded once
        want = 1 / factor.float() if spec.dtype == torch.int8 else product.float()  # MC2's scale (a float32 division); DeepEP's
        assert torch.equal(s, want), "scale: int8 1 / factor, e4m3 amax * (1 / QMAX), rounded once"
    # the values: the format's value nearest x * factor, up to the product's float32 rounding; in range
    v = x64 * factor.repeat_interleave(group, dim=1)[:, :hidden]
    got = q.double()
    assert bool((got.abs() <= spec.qmax).all())
    error = (got - v.clamp(-spec.qmax, spec.qmax)).abs()
    slack = v.abs() * 2.0**-24  # the product's own float32 rounding
    assert bool((error <= 0.5 * _grid_step(v, spec) + slack).all()), f"max error {error.max().item()} in grid steps"


def test_quantize_rounds_ties_to_even() -> None:
    """e4m3 steps by 8 around 100 (96, 104) and by 1 around 8.5: ties go to the even mantissa (96, -8); int8 2.5 to 2."""
    x = torch.tensor([[100.0, 448.0, -8.5]])  # amax 448: scale and factor exactly 1
    q, s = quant.quantize(x, quant.QuantSpec("fp8_e4m3", 0, round_scale=True))
    assert s.item() == 1.0 and q.float().tolist() == [[96.0, 448.0, -8.0]]
    qi, si = quant.quantize(torch.tensor([[2.5, 127.0, 3.5]]), quant.QuantSpec("int8", 0, round_scale=True))
    assert si.item() == 1.0 and qi.tolist() == [[2, 127, 4]]


# --- the local backend, plain torch ---------------------------------------------------------------


@settings(max_examples=60)
@given(problem=problems(world_size=1, max_tokens=40, max_experts=32, hidden_sizes=(1, 7, 128, 300), dtypes=DTYPES),
       spec=st.sampled_from(SPECS), prequantized=st.booleans())
def test_local_matches_reference(problem: Problem, spec: quant.QuantSpec, prequantized: bool) -> None:
    ours = quantized.rank_task(0, problem, spec, prequantized)
    rows, scales = quantized.expected(problem, spec)
    quantized.assert_rank_matches(problem, spec, 0, ours, rows[0], scales[0])


@settings(max_examples=40)
@given(problem=problems(world_size=1, max_tokens=40, max_experts=32, hidden_sizes=(1, 7, 128, 300), dtypes=DTYPES),
       spec=st.sampled_from(SPECS))
def test_straight_through_local(problem: Problem, spec: quant.QuantSpec) -> None:
    """``dequantize=True``: the rows of the tokens as quantizing rounds them, and ``x``'s and the router's
    gradients those of ``moe.dispatch`` of those rows (straight through the rounding), exactly."""
    quantized.assert_straight_through([quantized.straight_through_task(0, problem, spec)], problem, spec)


def test_prequantized_e5m2_rows_move_unchanged() -> None:
    """float8_e5m2 (no quant mode makes it: a caller's own) moves as it came, scales beside it."""
    x = torch.randn(6, 256).to(torch.float8_e5m2)
    s = torch.rand(6, 2) + 0.5
    idx = torch.tensor([[0, 1], [1, -1], [2, 0], [3, 2], [1, 3], [-1, -1]])
    d = moe_ops.dispatch(x, idx, torch.rand(6, 2), 4, x_scales=s)
    plain = moe_ops.dispatch(x.view(torch.uint8).float(), idx, torch.rand(6, 2), 4)
    assert d.recv_x.dtype == torch.float8_e5m2 and torch.equal(d.recv_x.view(torch.uint8).float(), plain.recv_x)
    token = torch.tensor([0, 2, 0, 1, 4, 2, 3, 3, 4])  # expert-major: the token of each row
    assert torch.equal(d.recv_scales, s[token])


# --- Triton kernels, interpreted -------------------------------------------------------------------


def _triton_equals_plain(rank: int, problem: Problem, spec: quant.QuantSpec, prequantized: bool, small_routes: int,
                         straight_through: bool) -> None:
    from moe_ops import config, stage
    from moe_ops.stage.kernels import layout
    from moe_ops.stage.kernels.quantize import quantize_rows

    previous = layout.SMALL_ROUTES
    layout.SMALL_ROUTES = small_routes
    try:
        assert config.kernels == "triton" and type(layout._scatter_rows).__name__ == "InterpretedFunction"
        ours = quantized.rank_task(0, problem, spec, prequantized)
        config.kernels = "torch"
        plain = quantized.rank_task(0, problem, spec, prequantized)
    finally:
        config.kernels = "triton"
        layout.SMALL_ROUTES = previous
    for name in ("recv_x", "recv_scales", "recv_weights", "tokens_per_expert", "dropped"):  # (sums: checked in rank_task)
        a, b = getattr(ours, name), getattr(plain, name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1 else b), name
    x = problem.xs[0].clone()
    if x.numel():  # signed zeros and magnitudes that round to zero keep their sign, as torch's casts do
        x.view(-1)[:4] = torch.tensor([-0.0, -1e-6, 1e-6, 0.0], dtype=x.dtype)
    for got, want in zip(quantize_rows(x, spec), quant.quantize(x, spec), strict=True):
        assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got, want.view(torch.uint8) if want.element_size() == 1 else want)
    # dequantizing (dequantize=True): every e4m3 byte and int8 value, then the whole straight-through step
    codes = [torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn), torch.arange(-128, 128, dtype=torch.int8)]
    scales = torch.rand(2, 1, generator=torch.Generator().manual_seed(small_routes)) * 3
    for q in codes:  # as rows [2, 128], and as a padded layout's [L, C, H] with a per-token scale
        for dtype in DTYPES:
            for rows, sc, block in ((q.view(2, 128), scales, 128), (q.view(2, 2, 64), scales.view(2, 1, 1).expand(2, 2, 1), 0)):
                got, want = stage.dequantize(rows, sc, block, dtype), quant.dequantize(rows, sc, block, dtype)
                assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), (q.dtype, dtype, block)
    if straight_through:
        quantized.assert_straight_through([quantized.straight_through_task(0, problem, spec)], problem, spec)


KERNEL_CASES = {
    "one launch, ragged": (dict(tokens=[30], hidden=300), 2048),
    "four launches, bounded, pad_multiple": (dict(tokens=[70], hidden=136, max_recv_rows=96, max_tokens_per_rank=70, pad_multiple=4), 0),
    "three launches, padded": (dict(tokens=[70], hidden=129, layout="padded", capacity=9, max_tokens_per_rank=70), 0),
    "no tokens": (dict(tokens=[0], hidden=64), 2048),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_triton_equals_plain(interpreted_worlds, case: str) -> None:
    """Each case with three of the eight modes (the interpreter is slow): every mode runs, quantized in the
    kernel or arriving quantized, on the one-launch or a many-launch path."""
    kw, small_routes = KERNEL_CASES[case]
    kw = dict(kw)
    tokens, hidden = kw.pop("tokens"), kw.pop("hidden")
    first = 3 * list(KERNEL_CASES).index(case)
    for i in range(first, first + 3):
        problem = make_problem(tokens, hidden, 8, 3, mask_fraction=0.2, dtype=DTYPES[i % 3], seed=i, **kw)
        # the whole straight-through step once (the interpreter is slow): bounded, the many-launch path
        straight_through = i == first + 1 and case == "four launches, bounded, pad_multiple"
        interpreted_worlds(1).run(_triton_equals_plain, problem, SPECS[i % len(SPECS)], i % 2 == 1, small_routes, straight_through)


# --- collective and allgather over gloo -------------------------------------------------------------

LAYOUTS = {"collective": ("ragged", "padded", "bounded"), "allgather": ("padded", "bounded")}


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", LAYOUTS)
@pytest.mark.parametrize("size", [2, 3])
def test_multirank_matches_reference(worlds, backend: str, size: int) -> None:
    @settings(max_examples=8)
    @given(problem=problems(world_size=size, max_tokens=40, max_experts=32, hidden_sizes=(7, 128, 200), dtypes=DTYPES,
                            layouts=LAYOUTS[backend]),
           spec=st.sampled_from(SPECS), way=st.sampled_from(("prequantized", "quant", "dequantize")))
    def check(problem: Problem, spec: quant.QuantSpec, way: str) -> None:
        if way == "dequantize":
            quantized.check_straight_through(worlds(size), problem, spec, backend)
        else:
            quantized.check_world(worlds(size), problem, spec, way == "prequantized", backend)

    check()


# --- errors, autograd, compilation ------------------------------------------------------------------


def _inputs(tokens: int = 6, hidden: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(tokens, hidden, generator=gen, dtype=torch.bfloat16), torch.randint(0, 4, (tokens, 2), generator=gen), \
        torch.rand(tokens, 2, generator=gen)


ERRORS = {
    "both x_scales and quant": (lambda x, i, w: dict(x=x.to(torch.float8_e4m3fn), x_scales=torch.ones(6, 2), quant="int8"), "not both"),
    "an unknown mode": (lambda x, i, w: dict(quant="fp4"), "quant must be one of"),
    "a block of 64": (lambda x, i, w: dict(quant="fp8_e4m3", quant_block=64), "quant_block must be 128"),
    "scales of the wrong width": (lambda x, i, w: dict(x=x.to(torch.float8_e4m3fn), x_scales=torch.ones(6, 3)), "x_scales has shape"),
    "scales of the wrong dtype": (lambda x, i, w: dict(x=x.to(torch.float8_e4m3fn), x_scales=torch.ones(6, 2, dtype=torch.bfloat16)),
                                  "x_scales must have dtype"),
    "scales for too few tokens": (lambda x, i, w: dict(x=x.to(torch.float8_e4m3fn), x_scales=torch.ones(5, 1)), "x_scales has shape"),
    "bf16 x with scales": (lambda x, i, w: dict(x_scales=torch.ones(6, 2)), "x must have dtype"),
    "an fp8 x to quantize": (lambda x, i, w: dict(x=x.to(torch.float8_e4m3fn), quant="int8"), "x must have dtype"),
    "round_scale with x_scales": (lambda x, i, w: dict(x=x.to(torch.int8), x_scales=torch.ones(6, 1), round_scale=True), "not both"),
    "dequantize with x_scales": (lambda x, i, w: dict(x=x.to(torch.int8), x_scales=torch.ones(6, 1), dequantize=True), "needs quant="),
    "dequantize without quant": (lambda x, i, w: dict(dequantize=True), "needs quant="),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_is_refused(case: str) -> None:
    make, message = ERRORS[case]
    x, idx, w = _inputs()
    kwargs = make(x, idx, w)
    kwargs.setdefault("x", x)
    with pytest.raises(MoEInputError, match=message):
        moe_ops.dispatch(kwargs.pop("x"), idx, w, 4, **kwargs)


def test_a_backend_without_quantized_rows_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backend that runs on a CPU here without a group moves quantized rows; the refusal (mc2_int8's)
    is driven through the flag the ops read, before anything moves."""
    from moe_ops.backends.local import LocalBackend

    monkeypatch.setattr(LocalBackend, "quantized", False)
    monkeypatch.setattr(ops, "_PLANS", {})  # a plan kept from an earlier call knew the flag as it was
    x, idx, w = _inputs()
    with pytest.raises(MoEInputError, match="backend 'local' does not dispatch quantized rows"):
        moe_ops.dispatch(x, idx, w, 4, quant="int8")


def test_x_requiring_a_gradient_is_refused() -> None:
    """Without ``dequantize`` (whose rows carry ``x``'s gradient: test_straight_through_local)."""
    x, idx, w = _inputs()
    with pytest.raises(MoEInputError, match="quantized rows carry none.*dequantize=True"):
        moe_ops.dispatch(x.requires_grad_(), idx, w, 4, quant="fp8_e4m3")
    with torch.no_grad():  # inference: nothing records, nothing to refuse
        assert moe_ops.dispatch(x, idx, w, 4, quant="fp8_e4m3").recv_x.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("layout", [dict(), dict(layout="padded", capacity=5), dict(max_recv_rows=16, max_tokens_per_rank=6)],
                         ids=["ragged", "padded", "bounded"])
def test_opcheck(layout: dict) -> None:
    x, idx, w = _inputs()
    options = dict(num_experts=4, zero_padding=True, **layout)
    op = torch.ops.moe.dispatch_quantized.default
    torch.library.opcheck(op, (x, idx, w), dict(options, quant="fp8_e4m3"))
    q, s = quant.quantize(x, quant.QuantSpec("int8", 0))
    torch.library.opcheck(op, (q, idx, w, s), options)
    # With the router's gradient, opcheck's AOT tests sum every output into one loss, which torch cannot
    # do for float8 (no sum) or int8 first (an int64 accumulator): test_compiles_with_static_shapes
    # compiles that backward instead.
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, (q, idx, w.clone().requires_grad_(), s), options, test_utils=no_aot)
    # dequantized rows (bf16, differentiable) go through every test, the AOT ones included
    grad = dict(options, quant="int8", quant_block=0, dequantize=True)
    torch.library.opcheck(op, (x.clone().requires_grad_(), idx, w.clone().requires_grad_()), grad)


@pytest.mark.parametrize("dequantize", [False, True], ids=["router gradient", "straight through"])
def test_compiles_with_static_shapes(dequantize: bool) -> None:
    """A bounded quantized dispatch, dequantized rows through combine and the router's gradient back (with
    ``dequantize``, ``x``'s too): one graph, no break, static shapes, equal to eager."""
    x, idx, w = _inputs()
    moe = moe_ops.Dispatcher(num_experts=4, max_recv_rows=16, max_tokens_per_rank=6, quant="fp8_e4m3", round_scale=True,
                             dequantize=dequantize)

    def step(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        d = moe.dispatch(x, idx, w)
        rows = d.recv_x if dequantize else quant.dequantize(d.recv_x, d.recv_scales, 128, torch.bfloat16)
        return moe.combine(rows * 3, d)

    def run(fn) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        tokens, weights = x.clone().requires_grad_(dequantize), w.clone().requires_grad_()
        out = fn(tokens, idx, weights)
        out.float().sum().backward()
        return (out, weights.grad, tokens.grad) if dequantize else (out, weights.grad)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for got, want in zip(run(compiled), run(step), strict=True):
        assert torch.equal(got, want)


# --- CUDA (the GPU loaner, not CI) -------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [37, 700], ids=["one launch", "four launches"])
def test_cuda_kernels_equal_plain(tokens: int) -> None:
    from moe_ops import config

    for i, spec in enumerate(SPECS):
        kw = [dict(), dict(layout="padded", capacity=40, max_tokens_per_rank=tokens),
              dict(max_recv_rows=-(-tokens * 2 // 16) * 16, max_tokens_per_rank=tokens, pad_multiple=16)][i % 3]
        problem = make_problem([tokens], [7168, 300, 2048][i % 3], 64, 8, mask_fraction=0.1, dtype=DTYPES[i % 3], seed=i, **kw)
        for prequantized in (False, True):
            ours = quantized.rank_task(0, problem, spec, prequantized, device="cuda")
            config.kernels = "torch"
            try:
                plain = quantized.rank_task(0, problem, spec, prequantized, device="cuda")
            finally:
                config.kernels = "auto"
            for name in ("recv_x", "recv_scales", "recv_weights", "tokens_per_expert", "dropped"):
                a, b = getattr(ours, name), getattr(plain, name)
                as_bits = (lambda t: t.view(torch.uint8) if t.element_size() == 1 else t)
                assert torch.equal(as_bits(a), as_bits(b)), (name, spec, prequantized, kw)
            rows, scales = quantized.expected(problem, spec)
            quantized.assert_rank_matches(problem, spec, 0, ours, rows[0], scales[0])


@pytest.mark.cuda
def test_cuda_straight_through() -> None:
    """``dequantize=True`` on the GPU: the Triton kernels' rows dequantized, and both gradients, equal to
    ``moe.dispatch`` of the tokens rounded by plain torch."""
    for i, spec in enumerate(SPECS):
        tokens = (37, 700)[i % 2]
        kw = [dict(), dict(max_recv_rows=tokens * 8, max_tokens_per_rank=tokens)][i // 4]
        problem = make_problem([tokens], 7168, 64, 8, mask_fraction=0.1, dtype=torch.bfloat16, seed=i, **kw)
        quantized.assert_straight_through([quantized.straight_through_task(0, problem, spec, device="cuda")], problem, spec)


@pytest.mark.cuda
def test_cuda_graph_capture() -> None:
    from moe_ops.testing import cuda_graph

    x = torch.randn(128, 7168, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 256, (128, 8), device="cuda")
    w = torch.rand(128, 8, device="cuda")

    def step() -> tuple[torch.Tensor, ...]:
        d = moe_ops.dispatch(x, idx, w, 256, layout="padded", capacity=16, quant="fp8_e4m3", zero_padding=True)
        return d.recv_x.view(torch.uint8), d.recv_scales, moe_ops.combine(quant.dequantize(d.recv_x, d.recv_scales, 128, torch.bfloat16), d)

    graph, outputs = cuda_graph.capture(step)
    x.copy_(torch.randn_like(x))
    graph.replay()
    for got, want in zip(outputs, step(), strict=True):
        assert torch.equal(got, want)
