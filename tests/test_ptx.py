"""The Triton kernels compiled ahead of time for Hopper (sm_90) on this CPU-only machine: each compiles,
and the rows it moves go through 16-byte vector instructions when sizes are 16-byte aligned (as Triton
specializes them at run time, for H = 7168 bf16 for example). Catches what the interpreter cannot: a
kernel Triton's compiler rejects, or an address whose alignment the compiler cannot see (the ``symm``
put kernels' stores into peer memory were scalar until the hint moved onto the pointers)."""

import pytest
import triton
import triton.language as tl

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moe_ops.backends.symm import put  # noqa: E402
from moe_ops.stage.kernels import layout, reduce  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
INT64_POINTERS = {"idx_ptr", "fill_rows_ptr", "ids_ptr", "peers_ptr", "route_row_ptr", "row_src_ptr", "src_index_ptr"}
INT32_POINTERS = {"hist_ptr", "rank_ptr", "chunk_base_ptr", "counts_ptr", "groups_ptr", "dropped_ptr", "meta_ptr"}
ALIGNED = {"x_stride", "src_stride", "token_stride", "row_stride", "hidden", "payload_cols", "row_bytes",
           "meta_offset", "weights_offset", "bound", "capacity"}  # what run-time specialization finds 16-aligned


def ptx(fn: triton.JITFunction, constexprs: dict[str, object], pointers: dict[str, str] | None = None) -> str:
    """``fn`` compiled for sm_90 with bf16 rows (``pointers``: other element types by name), its pointers
    and ``ALIGNED`` sizes 16-byte aligned."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in (pointers or {}):
            signature[name] = pointers[name]  # type: ignore[index]
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INT64_POINTERS else "*i32" if name in INT32_POINTERS else "*bf16"
        else:
            signature[name] = "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or n in ALIGNED}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned), target=HOPPER).asm["ptx"]


LAYOUT = dict(BINS=256, K_BLOCK=8, H_BLOCK=1024, P_BLOCK=128, SCALES=0, S_BLOCK=1, QMAX=0.0, QMAX_INV=0.0, GROUP=1024, INT8=False,
              ROUND_SCALE=False, AMAX_FLOOR=1e-4)
#: the scatter quantizing bf16 rows to fp8 with block scales: 4096 one-byte columns per program
QUANTIZING = dict(H_BLOCK=4096, SCALES=2, QMAX=448.0, QMAX_INV=1 / 448, GROUP=128)
FP8_ROWS = {"recv_x_ptr": "*u8", "recv_scales_ptr": "*fp32", "scales_ptr": "*fp32"}  # e4m3 stored as its bytes
SMALL = dict(LAYOUT, R_BLOCK=512, E_BLOCK=16)
PUT_TOKENS = dict(ROWS=8, BLOCK=2048, K_BLOCK=8, SCALES=0, S_BLOCK=1, QMAX=0.0, QMAX_INV=0.0, GROUP=2048, INT8=False,
                  ROUND_SCALE=False, AMAX_FLOOR=1e-4)
KERNELS = {
    "put_tokens": (put._put_tokens, PUT_TOKENS, "st.global.v4"),
    "put_tokens, quantizing to fp8 (block scales, UE8M0)": (
        put._put_tokens, dict(PUT_TOKENS, SCALES=2, QMAX=448.0, QMAX_INV=1 / 448, GROUP=128, ROUND_SCALE=True),
        "st.global.v4"
    ),
    "put_rows": (put._put_rows, dict(HAS_META=True, ROWS=8, BLOCK=2048, META_BLOCK=8), "st.global.v4"),
    "scatter_rows": (layout._scatter_rows, dict(LAYOUT, PADDED=True, PAD=False, BOUNDED=False, ZERO=False, CHUNK=128, PDL=True), "st.global.v4"),
    "scatter_rows, bounded, pad_multiple, zero padding": (
        layout._scatter_rows, dict(LAYOUT, PADDED=False, PAD=True, BOUNDED=True, ZERO=True, CHUNK=128, PDL=False), "st.global.v4"
    ),
    "scatter_rows, quantizing to fp8 (block scales)": (
        layout._scatter_rows, dict(LAYOUT, PADDED=True, PAD=False, BOUNDED=False, ZERO=False, CHUNK=128, PDL=True, **QUANTIZING), "st.global.v4",
        FP8_ROWS,
    ),
    "dispatch_small": (layout._dispatch_small, dict(SMALL, PADDED=True, PAD=False, BOUNDED=False, ZERO=False), "st.global.v4"),
    "dispatch_small, bounded, pad_multiple, zero padding": (
        layout._dispatch_small, dict(SMALL, PADDED=False, PAD=True, BOUNDED=True, ZERO=True), "st.global.v4"
    ),
    "reduce_rows": (reduce._reduce_rows, dict(HAS_WEIGHTS=True, UNIQUE=False, GATHER=False, ACC=tl.float32, K_BLOCK=8, H_BLOCK=1024), "ld.global.v4"),
    "reduce_rows, gathering (dispatch's backward)": (
        reduce._reduce_rows, dict(HAS_WEIGHTS=False, UNIQUE=False, GATHER=True, ACC=tl.float32, K_BLOCK=8, H_BLOCK=1024), "ld.global.v4"
    ),
}


@pytest.mark.parametrize("name", KERNELS)
def test_compiles_for_hopper_with_vector_access(name: str) -> None:
    fn, constexprs, vector, *pointers = KERNELS[name]
    code = ptx(fn, constexprs, *pointers)
    assert vector in code, f"{name}: no {vector} in its sm_90 PTX; scalar stores: {code.count('st.global.b16')}"


PDL = {  # kernel: where its wait for the kernel before it must come (None: it waits for nothing, only lets the next start)
    "_chunk_ranks": (layout._chunk_ranks, dict(CHUNK=128, BINS=256, FILL_BLOCK=1024), None),
    "_expert_prefix": (layout._expert_prefix, dict(BINS=256, EXPERTS=32, ROWS=256), "ld.global"),
    "_expert_groups": (layout._expert_groups, dict(BINS=256, PAD=True, BOUNDED=True), "ld.global"),
    "_scatter_rows": (layout._scatter_rows, dict(LAYOUT, PADDED=False, PAD=False, BOUNDED=True, ZERO=False, CHUNK=128), "ld.global.b32"),
}


@pytest.mark.parametrize("name", PDL)
def test_programmatic_dependent_launch(name: str) -> None:
    """With ``PDL`` the dispatch kernels after the first wait (``griddepcontrol.wait``) before they read
    what an earlier kernel wrote, and the row copy loads its source row before that wait; without it
    neither instruction is emitted (the interpreter and GPUs before sm_90 get that variant)."""
    fn, constexprs, first_dependent_load = PDL[name]
    code = ptx(fn, dict(constexprs, PDL=True))
    wait = code.find("griddepcontrol.wait")
    if first_dependent_load is None:
        assert wait < 0 and "griddepcontrol.launch_dependents" in code
    else:
        assert wait >= 0, f"{name}: no griddepcontrol.wait"
        assert "griddepcontrol.launch_dependents" in code or name == "_scatter_rows"
    if name == "_scatter_rows":  # the source row's 16-byte loads come before the wait, the workspace's loads after it
        assert 0 <= code.find("ld.global.v4") < wait < code.find(first_dependent_load, wait)
    off = ptx(fn, dict(constexprs, PDL=False))
    assert "griddepcontrol" not in off
