"""The Triton kernels behind `gathered_logprobs` (the math and the autograd wiring: fused_logprobs.py).

Two kernels, each a matrix product h Wᵀ computed tile by tile with a different epilogue:

    _forward_kernel   z = h Wᵀ / τ for a block of rows and a span of vocabulary tiles, reduced on the
                      fly to per-row statistics: the running max m, Σ exp(z − m) and the target's
                      logit. With WITH_DH (lm_head frozen) it also accumulates, rescaled like the sum,
                      Σ_{v≠t} exp(z_v − m) and Σ_{v≠t} exp(z_v − m)·W_v, the second product of the
                      frozen floor: the backward then has nothing left to multiply. Nothing of size
                      N×V is written; the spans' statistics are merged by `combine` in fused_logprobs.py.
    _dlogits_kernel   (lm_head trainable) the same tile of z, recomputed, turned into the fp32 gradient
                      of the logits dz = (g/τ)·(onehot(target) − exp(z − lse)) and written into a buffer
                      that covers one vocabulary chunk (N × C, C ≪ V); the gradient products dh += dz W_c
                      and dW_c = dzᵀ h are plain fp32 matrix products left to torch.

Why the trainable backward is split that way rather than into a dh kernel over row blocks and a dW
kernel over vocabulary blocks: a dh accumulator needs all D columns of its rows (D = 1536 for
Qwen2-1.5B), too large for registers; keeping it in global memory is a read-modify-write per tile.
The frozen forward does exactly that, but race-free: each program owns its rows of one span's (N, D)
accumulator, so no atomics are needed and the result does not depend on scheduling.

Precision of the frozen forward's second product: exp(z − m) is rounded to the weight's dtype to run
on the tensor cores (scaled by P_SCALE first: fp16's smallest normal is 6e-5, while p averages 7e-6
over a 151,936-token vocabulary), the target's column is left out of it (1 − p_t is kept as the fp32
sum of the other terms, never as a difference), and the sum of the others is taken over the same
rounded values, so that a component shared by every row of W cancels exactly in W[t] − Σ p_v W_v.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors, where `tl.dot` on bf16 is broken (it
multiplies bit patterns), so tiles are converted to fp32 before the dot when interpreting, after the
rounding the GPU would do. Block sizes stay ≥ 16 (the GPU compiler rejects smaller dots); every load
is masked, so no size needs to be a multiple of a block.

Triton ≥ 3.1 (MIN_TRITON): the kernels use tl.dot's `input_precision` (Triton 3.0), and 3.1 is what
the oldest torch that setup.py accepts (2.5) ships with. Importing this module with an older Triton
raises ImportError, which fused_logprobs turns into one warning and the PyTorch path.
"""

import re

import torch
import triton

MIN_TRITON = (3, 1)
_found = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
if _found < MIN_TRITON:
    raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, "
                      "the oldest the minirl.kernels Triton kernels support")

import triton.language as tl  # noqa: E402  (after the version check: an old Triton may differ here)

# Block sizes (rows of h, vocabulary columns, hidden features). Module globals so that tests can make
# them small to cross tile and split boundaries with small shapes.
BLOCK_N, BLOCK_V, BLOCK_D = 64, 128, 64
TARGET_PROGRAMS = 1024  # the forward splits the vocabulary until about this many programs run (GPU occupancy)
P_SCALE = 2.0**14  # exp(z − m) ≤ 1 times this stays under fp16's maximum (65504)


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """h[rows] · W[cols]ᵀ as a (BLOCK_N, BLOCK_V) fp32 tile, accumulated over D in BLOCK_D steps."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)  # V·D can pass 2³¹ for large models
    for d0 in range(0, D, BLOCK_D):
        ks = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :] * stride_hd,
                    mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        wt = tl.load(w_ptr + cols64[None, :] * stride_wv + ks[:, None] * stride_wd,
                     mask=(cols[None, :] < V) & (ks[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_V)
        if DOT_F32:
            h, wt = h.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(h, wt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, zt_ptr, so_ptr, a_ptr,
                    N, V, D, span, tau, stride_hn, stride_hd, stride_wv, stride_wd,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    WITH_DH: tl.constexpr, P_SCALE: tl.constexpr, DOT_F32: tl.constexpr,
                    PRECISION: tl.constexpr):
    # Program (i, j) owns rows [i·BLOCK_N, (i+1)·BLOCK_N) and vocabulary columns [j·span, (j+1)·span),
    # walked BLOCK_V at a time with an online max and sum; it writes its per-row numbers at [j, row]
    # and, with WITH_DH, its rows of the span's (N, D) accumulator at a_ptr + j·N·D.
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    targets = tl.load(t_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − m)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)  # z[target] when the target falls in this span
    so = tl.zeros((BLOCK_N,), dtype=tl.float32)  # P_SCALE · Σ_{v≠t} exp(z_v − m), as rounded for the dot
    a_rows = a_ptr + pid_s.to(tl.int64) * N * D + rows64[:, None] * D  # (BLOCK_N, 1) row starts
    v_start = pid_s * span
    v_end = tl.minimum(v_start + span, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PRECISION) / tau
        z = tl.where(cols[None, :] < v_end, z, float("-inf"))  # padding columns weigh exp(−∞) = 0
        is_t = cols[None, :] == targets[:, None]
        zt += tl.sum(tl.where(is_t, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile holds at least one real column
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * scale + tl.sum(p, axis=1)
        if WITH_DH:
            q = (tl.where(is_t, 0.0, p) * P_SCALE).to(w_ptr.dtype.element_ty)  # what the tensor cores see
            so = so * scale + tl.sum(q.to(tl.float32), axis=1)
            if DOT_F32:
                q = q.to(tl.float32)
            cols64 = cols.to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                ks = d0 + tl.arange(0, BLOCK_D)
                wv = tl.load(w_ptr + cols64[:, None] * stride_wv + ks[None, :] * stride_wd,
                             mask=(cols[:, None] < v_end) & (ks[None, :] < D), other=0.0)  # (BLOCK_V, BLOCK_D)
                if DOT_F32:
                    wv = wv.to(tl.float32)
                # One pointer tensor for the load and the store: each thread reads back what it wrote.
                a_tile, inside = a_rows + ks[None, :], (rows[:, None] < N) & (ks[None, :] < D)
                acc = tl.load(a_tile, mask=inside, other=0.0) * scale[:, None]
                acc = tl.dot(q, wv, acc, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D) += q W_tile
                tl.store(a_tile, acc, mask=inside)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=rows < N)
    tl.store(s_ptr + out, s, mask=rows < N)
    tl.store(zt_ptr + out, zt, mask=rows < N)
    if WITH_DH:
        tl.store(so_ptr + out, so, mask=rows < N)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr,
                    N, V, D, v_offset, tau, stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    # Program (i, j) owns the tile dz[i·BLOCK_N : (i+1)·BLOCK_N, j·BLOCK_V : (j+1)·BLOCK_V] of one
    # vocabulary chunk: w_ptr points at the chunk's first row, V is the chunk's width and the chunk
    # starts at column v_offset of the full vocabulary.
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                    BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PRECISION) / tau
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    g = tl.load(g_ptr + rows, mask=rows < N, other=0.0) / tau
    targets = tl.load(t_ptr + rows, mask=rows < N, other=-1) - v_offset
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))  # (BLOCK_N, BLOCK_V) fp32
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + cols[None, :], dz,
             mask=(rows[:, None] < N) & (cols[None, :] < V))


# Whether the kernels were decorated for the interpreter: triton.jit reads TRITON_INTERPRET when it
# wraps a function, so a variable set after this import would not change them. Asked of the kernel
# itself, the way every Triton since 3.0 answers it (triton.knobs exists only from 3.3 on).
INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


def _dot_settings(x: torch.Tensor):
    """(DOT_F32, PRECISION): fp32 tiles under the interpreter (its bf16 dot is broken); fp32 inputs on a
    GPU follow torch's own TF32 switch, so the kernel and a torch matmul round alike."""
    dot_f32 = INTERPRETED or x.dtype == torch.float32
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dot_f32, "tf32" if tf32 else "ieee"


def _launch_options(x: torch.Tensor) -> dict:
    return {} if INTERPRETED else dict(num_warps=8, num_stages=3 if x.element_size() == 2 else 2)


def forward_stats(hidden, weight, targets, temperature: float, with_dh: bool, max_floats: int):
    """Per-span statistics for fused_logprobs.combine: (m, s, zt, so, a), m, s, zt and so (S, N) fp32,
    a (S, N, D) fp32; so and a are None unless with_dh. With with_dh, S·N·D ≤ max(N·D, max_floats)."""
    N, D = hidden.shape
    V = weight.shape[0]
    row_blocks = triton.cdiv(N, BLOCK_N)
    tiles = triton.cdiv(V, BLOCK_V)
    spans = min(tiles, triton.cdiv(TARGET_PROGRAMS, row_blocks))
    if with_dh:  # each span holds its own (N, D) accumulator: fewer spans, bounded memory
        spans = min(spans, max(1, max_floats // (N * D)))
    tiles_per_span = triton.cdiv(tiles, spans)
    S = triton.cdiv(tiles, tiles_per_span)
    m, s, zt, so = torch.empty((4, S, N), dtype=torch.float32, device=hidden.device)
    # Zeros: a program scales its accumulator before adding to it, and 0 · garbage can be NaN.
    a = torch.zeros((S, N, D) if with_dh else (1,), dtype=torch.float32, device=hidden.device)
    dot_f32, precision = _dot_settings(hidden)
    _forward_kernel[(row_blocks, S)](
        hidden, weight, targets, m, s, zt, so, a, N, V, D, tiles_per_span * BLOCK_V, float(temperature),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, WITH_DH=with_dh, P_SCALE=P_SCALE,
        DOT_F32=dot_f32, PRECISION=precision, **_launch_options(hidden))
    if not with_dh:
        return m, s, zt, None, None
    return m, s, zt, so.div_(P_SCALE), a.div_(P_SCALE)  # powers of two: exact


def dlogits(hidden, weight_chunk, targets, lse, grad, temperature: float, v_offset: int, out: torch.Tensor):
    """Fill out (N, C) fp32 with (g/τ)·(onehot − softmax) for the C vocabulary rows in weight_chunk."""
    N, D = hidden.shape
    C = weight_chunk.shape[0]
    dot_f32, precision = _dot_settings(hidden)
    _dlogits_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_V))](
        hidden, weight_chunk, targets, lse, grad, out, N, C, D, v_offset, float(temperature),
        hidden.stride(0), hidden.stride(1), weight_chunk.stride(0), weight_chunk.stride(1), out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, DOT_F32=dot_f32, PRECISION=precision,
        **_launch_options(hidden))
    return out
