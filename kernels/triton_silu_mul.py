"""Triton SiLU-and-mul: x [..., 2I] -> silu(x[..., :I]) * x[..., I:] (fused gate/up MLP).

Grid (rows, I / BLOCK): each program reads BLOCK gate and BLOCK up elements of one row,
computes in float32 and rounds once to the output dtype (PyTorch rounds twice: after silu
and after the product). Rows may be strided (only the last dim must be contiguous); the
output is a new contiguous [..., I] tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    src = x_ptr + row * x_stride + cols
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + I, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * I + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs
def _config(inter: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 1024 elements of each half per program, 8 per thread with 4 warps
    (16-byte fp16 accesses); smaller rows get one program each."""
    block = min(triton.next_power_of_2(inter), 1024)
    return block, max(1, min(4, block // 256))


# --------------------------------------------------------------------------- launcher
def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [rows, N] keeping the row stride; copies only if leading dims cannot merge."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _launch(x):
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = _as_rows(x)
    if x2.stride(-1) != 1:
        raise ValueError("x: last dimension must be contiguous")
    block, warps = _config(inter)
    grid = (x2.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x2, out, x2.stride(0), inter, BLOCK=block, num_warps=warps)
    return out


# Opaque to torch.compile (fullgraph); eager calls bypass the dispatcher.
@torch.library.custom_op("ragged_triton::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return _launch(x)


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# --------------------------------------------------------------------------- public
def silu_and_mul(x):
    """silu(x[..., :I]) * x[..., I:] -> new [..., I] tensor."""
    if torch.compiler.is_compiling():
        return torch.ops.ragged_triton.silu_and_mul(x)
    return _launch(x)
