"""Tolerances relative to PyTorch's own low-precision error (flash-attention's rule).

    err(kernel vs float64 reference) <= FACTOR * err(PyTorch in the kernel's dtype vs float64
    reference) + floor

The floor is a couple of ulps of the output's magnitude in the kernel's dtype: for float32,
where PyTorch's own error can be ~0, it allows the kernel a different (equally valid)
summation order; it is never widened to make a test pass.
"""
import torch

FACTOR = 2.0
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23,
       torch.float64: 2.0 ** -52}


def errors(out: torch.Tensor, ref: torch.Tensor):
    d = (out.double() - ref.double()).abs()
    return d.max().item() if d.numel() else 0.0, d.mean().item() if d.numel() else 0.0


def assert_close(out, ref, lowp_ref, name="", floor_ulps=4.0, factor=FACTOR):
    """out: the kernel's result; ref: float64 ground truth; lowp_ref: PyTorch in out's dtype."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    max_err, mean_err = errors(out, ref)
    base_max, base_mean = errors(lowp_ref, ref)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    floor = floor_ulps * EPS[out.dtype] * max(scale, 1e-3)
    tol = factor * base_max + floor
    print(f"{name}: max err {max_err:.3e} mean {mean_err:.3e} | torch {out.dtype} max "
          f"{base_max:.3e} mean {base_mean:.3e} | tol {tol:.3e}")
    assert max_err <= tol, f"{name}: max error {max_err:.3e} > tolerance {tol:.3e}"
    assert mean_err <= factor * base_mean + floor, (
        f"{name}: mean error {mean_err:.3e} > {factor} x torch's {base_mean:.3e} + {floor:.1e}")
