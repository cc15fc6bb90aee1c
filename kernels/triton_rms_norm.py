"""Triton RMSNorm with an optional fused residual add, over the last dim of any tensor.

One program normalises one row, held whole in registers (hidden sizes up to 65536; 4096
fp16 is 8 KiB, one pass over HBM). Rounding follows the reference (Hugging Face's Llama):
the residual sum is rounded to the input dtype (that rounded sum is what the residual stream
carries and what is normalised), the mean of squares is accumulated in float32, the
normalised row is cast to the input dtype and only then multiplied by the weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, x_stride, res_stride, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)    # rounded like torch's add
        tl.store(sum_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)        # torch.rsqrt: rsqrt.approx on GPU
    hn = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (hn * w).to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs
def _config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): the whole row, 8 to 16 elements per thread."""
    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 512))


# --------------------------------------------------------------------------- launcher
def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [rows, N] keeping the row stride; copies only if leading dims cannot merge."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _launch(x, weight, eps: float, residual):
    N = x.shape[-1]
    if N > MAX_HIDDEN:
        raise ValueError(f"x: last dim {N} exceeds the Triton RMSNorm limit of {MAX_HIDDEN}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if x.numel() == 0:
        return y, s
    x2 = _as_rows(x)
    r2 = _as_rows(residual) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        raise ValueError("x: last dimension must be contiguous")
    block, warps = _config(N)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, s if s is not None else y,
                                     x2.stride(0), r2.stride(0), N, eps,
                                     HAS_RESIDUAL=residual is not None, BLOCK_N=block,
                                     num_warps=warps)
    return y, s


# Two ops because a custom op's return type is fixed. Eager calls bypass the dispatcher.
@torch.library.custom_op("ragged_triton::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, weight, eps, None)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("ragged_triton::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, weight, eps, residual)


@_fused_add_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    return x.new_empty(x.shape), x.new_empty(x.shape)


# --------------------------------------------------------------------------- public
def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm(x) * weight; with residual returns (RMSNorm(x + residual) * weight, x + residual)."""
    if torch.compiler.is_compiling():
        if residual is None:
            return torch.ops.ragged_triton.rms_norm(x, weight, eps)
        return torch.ops.ragged_triton.fused_add_rms_norm(x, weight, eps, residual)
    y, s = _launch(x, weight, eps, residual)
    return y if residual is None else (y, s)
