"""The fused re-noise step of the few-step sampler: a Triton kernel beside its PyTorch reference.

Between two generator evaluations the sampler moves its x0 estimate to the next timestep:

    x0     = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)        (only in ``from_eps`` mode)
    x_next = sqrt(abar_next) * x0 + sqrt(1 - abar_next) * z,      z ~ N(0, I)

Eager PyTorch spends three to five kernels and a full noise tensor on this. The kernel reads
x_t and eps (or x0) once, draws z in registers with Philox and writes x_next once.

The noise is a pure function of (seed, stream, element index), so a sample's noise does not
depend on the batch it shares, the block size or the device:

* Philox4x32-10 (Salmon et al., SC'11) with key = the sample's 64-bit seed and counter
  ``(c, stream, 0, 0)``; counter ``c`` in ``[0, ceil(n / 4))`` gives four uint32 words.
* Each word becomes a uniform in [0, 1) (the word as int32, folded to >= 0, times 2^-31), and
  pairs (u1, u2), (u3, u4) become normals by Box-Muller.
* Normal k of counter c lands on element ``k * ceil(n / 4) + c`` of the sample, so each program
  reads and writes four contiguous runs.

``stream`` numbers the draws of one sampling run: 0 is the starting noise, i is the noise that
takes step i's x0 to the next timestep. :func:`philox_normal_reference` computes the same
numbers with integer PyTorch ops, so the CPU path and the tests agree with the kernel to float
rounding of log/cos.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU installs may lack it (the reference still works).
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

PHILOX_ROUNDS = 10
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF

# What the kernel computes; each mode is one compile-time specialisation.
MODE_NOISE, MODE_X0, MODE_EPS = 0, 1, 2


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------

def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b`` for a constant ``a`` and uint32 values in int64 ``b``.

    The 64-bit product overflows int64, so ``b`` is split into 16-bit halves.
    """
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_reference(seed: Tensor, c0: Tensor, c1: Tensor, c2: Tensor | None = None, c3: Tensor | None = None,
                         rounds: int = PHILOX_ROUNDS) -> list[Tensor]:
    """Philox4x32 on counter words ``(c0, c1, c2, c3)`` (c2, c3 default 0) with key ``seed``.

    All arguments are int64 tensors (broadcast); the key is the seed's low and high 32 bits.
    Returns the four output words as int64 tensors holding uint32 values.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    zero = torch.zeros_like(c0)
    c2 = zero if c2 is None else c2
    c3 = zero if c3 is None else c3
    x0, x1, x2, x3 = c0 & _MASK32, c1 & _MASK32, c2 & _MASK32, c3 & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, x2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, x0)
        x0, x1, x2, x3 = hi_b ^ x1 ^ k0, lo_b, hi_a ^ x3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [x0, x1, x2, x3]


def _uniform(word: Tensor) -> Tensor:
    """uint32 word -> float32 uniform in [0, 1): the signed value, folded to >= 0, times 2^-31."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    u1 = u1.clamp_min(1.0e-7)
    theta = 6.283185307179586 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_normal_reference(seeds: Tensor, stream: int, n: int, rounds: int = PHILOX_ROUNDS) -> Tensor:
    """The kernel's noise in plain PyTorch: (B, n) float32 normals, row b from ``seeds[b]`` alone.

    Args:
        seeds: (B,) integer seeds (any int64 value; 64-bit seeds use both key words).
        stream: which draw of the sampling run (0: starting noise, i: re-noise after step i).
        n: elements per sample.
        rounds: Philox rounds (10 is the standard; the kernel uses the same constant).
    """
    quarter = -(-n // 4)
    seeds = seeds.to(device="cpu", dtype=torch.int64).reshape(-1, 1)
    counter = torch.arange(quarter, dtype=torch.int64).reshape(1, -1)
    words = philox4x32_reference(seeds, counter.expand(seeds.shape[0], -1), torch.full_like(counter, stream),
                                 rounds=rounds)
    u = [_uniform(w) for w in words]
    z1, z2 = _box_muller(u[0], u[1])
    z3, z4 = _box_muller(u[2], u[3])
    return torch.cat([z1, z2, z3, z4], dim=1)[:, :n]


def _coefficients(abar_t: float | None, abar_next: float) -> tuple[float, float, float, float]:
    """(1/sqrt(abar_t), sqrt(1-abar_t), sqrt(abar_next), sqrt(1-abar_next)) as Python floats."""
    inv_a_t, s_t = (1.0, 0.0) if abar_t is None else (1.0 / math.sqrt(abar_t), math.sqrt(1.0 - abar_t))
    return inv_a_t, s_t, math.sqrt(abar_next), math.sqrt(1.0 - abar_next)


def renoise_reference(
    x: Tensor | None, seeds: Tensor, stream: int, abar_next: float, eps: Tensor | None = None,
    abar_t: float | None = None, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
) -> Tensor:
    """What :func:`renoise` computes, in eager PyTorch (float32 arithmetic).

    Three modes, as in the kernel: ``x`` None -> ``sqrt(1 - abar_next) * z`` of ``(B, *shape)``;
    ``eps`` None -> ``x`` is x0; otherwise ``x`` is x_t and x0 is recovered with ``abar_t``.
    """
    inv_a_t, s_t, a_next, s_next = _coefficients(abar_t, abar_next)
    full_shape = (seeds.shape[0], *shape) if x is None else tuple(x.shape)
    device = seeds.device if x is None else x.device
    out_dtype = dtype or (torch.float32 if x is None else x.dtype)
    n = math.prod(full_shape[1:])
    z = philox_normal_reference(seeds, stream, n).reshape(full_shape).to(device)
    if x is None:
        return (s_next * z).to(out_dtype)
    x0 = x.float() if eps is None else (x.float() - s_t * eps.float()) * inv_a_t
    return (a_next * x0 + s_next * z).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _uniform01(word):
        """uint32 word -> float32 uniform in [0, 1)."""
        x = word.to(tl.int32, bitcast=True)
        x = tl.where(x < 0, -x - 1, x)
        return x.to(tl.float32) * 4.6566127342e-10

    @triton.jit
    def _box_muller_pair(w1, w2, FAST_MATH: tl.constexpr):
        """Two uint32 words -> two independent N(0, 1) samples."""
        u1 = tl.maximum(_uniform01(w1), 1.0e-7)
        theta = 6.283185307179586 * _uniform01(w2)
        if FAST_MATH:  # the special-function unit's approximations (GPU only; ~1e-6 absolute)
            r = tl.sqrt(-1.3862943611198906 * libdevice.fast_log2f(u1))  # -2 ln u = -2 ln2 log2 u
            return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(theta), r * tl.sin(theta)

    @triton.jit
    def _store_one(x_ptr, eps_ptr, out_ptr, base, idx, mask, z,
                   inv_a_t, s_t, a_next, s_next, MODE: tl.constexpr):
        """One of the four normals of a counter: combine with x0 and store."""
        if MODE == 0:
            val = s_next * z
        elif MODE == 1:
            x0 = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            val = a_next * x0 + s_next * z
        else:
            x_t = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(eps_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            val = a_next * ((x_t - s_t * e) * inv_a_t) + s_next * z
        tl.store(out_ptr + base + idx, val.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _renoise_kernel(x_ptr, eps_ptr, out_ptr, seed_ptr, n, quarter, stream_hi,
                        inv_a_t, s_t, a_next, s_next, MODE: tl.constexpr, BLOCK: tl.constexpr,
                        FAST_MATH: tl.constexpr):
        """Grid (ceil(quarter / BLOCK), B): program (p, b) owns counters [p*BLOCK, (p+1)*BLOCK) of sample b."""
        b = tl.program_id(1)
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr + b)
        offset = c.to(tl.int64) + stream_hi  # counter words (c, stream): stream_hi = stream << 32
        w1, w2, w3, w4 = tl.randint4x(seed, offset)
        z1, z2 = _box_muller_pair(w1, w2, FAST_MATH)
        z3, z4 = _box_muller_pair(w3, w4, FAST_MATH)
        base = b.to(tl.int64) * n
        live = c < quarter
        _store_one(x_ptr, eps_ptr, out_ptr, base, c, live & (c < n), z1, inv_a_t, s_t, a_next, s_next, MODE)
        _store_one(x_ptr, eps_ptr, out_ptr, base, c + quarter, live & (c + quarter < n), z2,
                   inv_a_t, s_t, a_next, s_next, MODE)
        _store_one(x_ptr, eps_ptr, out_ptr, base, c + 2 * quarter, live & (c + 2 * quarter < n), z3,
                   inv_a_t, s_t, a_next, s_next, MODE)
        _store_one(x_ptr, eps_ptr, out_ptr, base, c + 3 * quarter, live & (c + 3 * quarter < n), z4,
                   inv_a_t, s_t, a_next, s_next, MODE)


# Tuning, measured on an H100 (docs/bench): 256 counters (1,024 elements) per program and the
# special-function unit's log/sin/cos reach 86% of copy bandwidth at 256x4x128x128, against 63%
# with the precise functions and 52% with 1,024-counter programs. Neither changes which noise
# an element gets; fast math changes its value by about 1e-6.
BLOCK = 256


def renoise_triton(
    x: Tensor | None, seeds: Tensor, stream: int, abar_next: float, eps: Tensor | None = None,
    abar_t: float | None = None, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
    block: int = BLOCK, fast_math: bool | None = None,
) -> Tensor:
    """The Triton kernel; same arguments and result as :func:`renoise_reference`.

    ``seeds`` must be an int64 tensor on the same device as ``x``. Launch arguments depend only
    on shapes and Python floats, so the call can be captured in a CUDA graph. ``block`` and
    ``fast_math`` are tuning knobs; ``fast_math`` None means on for a GPU and off under the
    interpreter (which has no libdevice).
    """
    if fast_math is None:
        fast_math = os.environ.get("TRITON_INTERPRET") != "1"
    if triton is None:
        raise RuntimeError("the Triton re-noise kernel needs the 'triton' package (pip install triton)")
    inv_a_t, s_t, a_next, s_next = _coefficients(abar_t, abar_next)
    if x is None:
        out = torch.empty((seeds.shape[0], *shape), device=seeds.device, dtype=dtype or torch.float32)
        mode, x_arg, eps_arg = MODE_NOISE, out, out
    else:
        x = x.contiguous()
        out = torch.empty_like(x, dtype=dtype or x.dtype)
        mode, x_arg = (MODE_X0, x) if eps is None else (MODE_EPS, x)
        eps_arg = x if eps is None else eps.contiguous()
    batch = out.shape[0]
    n = out[0].numel()
    quarter = -(-n // 4)
    if batch == 0 or n == 0:
        return out
    grid = (triton.cdiv(quarter, block), batch)
    _renoise_kernel[grid](x_arg, eps_arg, out, seeds, n, quarter, int(stream) << 32,
                          inv_a_t, s_t, a_next, s_next, MODE=mode, BLOCK=block, FAST_MATH=fast_math)
    return out


def renoise(
    x: Tensor | None, seeds: Tensor, stream: int, abar_next: float, eps: Tensor | None = None,
    abar_t: float | None = None, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
) -> Tensor:
    """Fused re-noise: the kernel on CUDA tensors, the reference elsewhere (same numbers).

    Args:
        x: x0 (``eps`` None), x_t (``eps`` given) or None (pure noise of ``shape``), (B, ...).
        seeds: (B,) int64, one seed per sample.
        stream: the draw's number within the run (0: starting noise; i: after step i).
        abar_next: ``alphas_cumprod`` of the timestep to move to.
        eps: the predicted noise at ``abar_t`` (fuses eps -> x0 into the same pass).
        abar_t: ``alphas_cumprod`` of x_t's timestep (with ``eps``).
        shape: per-sample shape when ``x`` is None.
        dtype: output dtype (default: ``x``'s, float32 for pure noise).
    """
    device = seeds.device if x is None else x.device
    if device.type == "cuda" and triton is not None:
        return renoise_triton(x, seeds.to(device=device, dtype=torch.int64), stream, abar_next, eps, abar_t,
                              shape, dtype)
    return renoise_reference(x, seeds, stream, abar_next, eps, abar_t, shape, dtype)
