"""The Triton kernels behind `gathered_logprobs` (the math and the autograd wiring: fused_logprobs.py).

Two kernels, each a matrix product h Wᵀ computed tile by tile with a different epilogue:

    _forward_kernel   z = h Wᵀ / τ for a block of rows and a span of vocabulary tiles, reduced on the
                      fly to per-row statistics: the running max m, Σ exp(z − m), Σ exp(z − m)·z (for
                      the entropy) and the target's logit. Nothing of size N×V is written; the spans'
                      statistics are merged by `combine` in fused_logprobs.py.
    _dlogits_kernel   the same tile of z, recomputed, turned into the gradient of the logits
                      dz = (g/τ)·(onehot(target) − exp(z − lse)) and written into a buffer that covers
                      one vocabulary chunk (N × C, C ≪ V); the two gradient products dh += dz W_c and
                      dW_c = dzᵀ h are plain matrix products left to torch (cuBLAS on a GPU).

Why the backward is split that way rather than into a dh kernel over row blocks and a dW kernel over
vocabulary blocks: a program that owns a block of dh rows needs all D columns of them (D = 1536 for
Qwen2-1.5B) as its accumulator, which is too large for registers; keeping it in global memory means a
read-modify-write per tile (or atomics), racy or slow on a GPU and invisible to the interpreter. One
chunk of dz, bounded in size, and two library matrix products are deterministic and as fast as the
plain products they are.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors, where `tl.dot` on bf16 is broken (it
multiplies bit patterns), so tiles are converted to fp32 before the dot when interpreting. Block sizes
stay ≥ 16 (the GPU compiler rejects smaller dots); every load is masked, so no size needs to be a
multiple of a block.
"""

import torch
import triton
import triton.language as tl

# Block sizes (rows of h, vocabulary columns, hidden features). Module globals so that tests can make
# them small to cross tile and split boundaries with small shapes.
BLOCK_N, BLOCK_V, BLOCK_D = 64, 128, 64
TARGET_PROGRAMS = 1024  # the forward splits the vocabulary until about this many programs run (GPU occupancy)
# Whether the kernels below are decorated for the interpreter: triton.jit reads TRITON_INTERPRET when it
# wraps a function, so a variable set after this import would not change them.
INTERPRETED = bool(triton.knobs.runtime.interpret)


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
def _forward_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, e_ptr, zt_ptr,
                    N, V, D, span, tau, stride_hn, stride_hd, stride_wv, stride_wd,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    # Program (i, j) owns rows [i·BLOCK_N, (i+1)·BLOCK_N) and vocabulary columns [j·span, (j+1)·span),
    # walked BLOCK_V at a time with an online max and sum; it writes four numbers per row at [j, row].
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    targets = tl.load(t_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − m)
    e = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − m)·z
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)  # z[target] when the target falls in this span
    v_start = pid_s * span
    v_end = tl.minimum(v_start + span, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PRECISION) / tau
        z = tl.where(cols[None, :] < v_end, z, float("-inf"))  # padding columns weigh exp(−∞) = 0
        zt += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile holds at least one real column
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * scale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            e = e * scale + tl.sum(p * tl.where(cols[None, :] < v_end, z, 0.0), axis=1)  # 0·(−∞) avoided
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=rows < N)
    tl.store(s_ptr + out, s, mask=rows < N)
    tl.store(zt_ptr + out, zt, mask=rows < N)
    if WITH_ENTROPY:
        tl.store(e_ptr + out, e, mask=rows < N)


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
    dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))  # (BLOCK_N, BLOCK_V)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + cols[None, :], dz,
             mask=(rows[:, None] < N) & (cols[None, :] < V))


def _dot_settings(x: torch.Tensor):
    """(DOT_F32, PRECISION): fp32 tiles under the interpreter (its bf16 dot is broken); fp32 inputs on a
    GPU follow torch's own TF32 switch, so the kernel and a torch matmul round alike."""
    dot_f32 = INTERPRETED or x.dtype == torch.float32
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dot_f32, "tf32" if tf32 else "ieee"


def _launch_options(x: torch.Tensor) -> dict:
    return {} if INTERPRETED else dict(num_warps=8, num_stages=3 if x.element_size() == 2 else 2)


def forward_stats(hidden, weight, targets, temperature: float, with_entropy: bool):
    """Per-span statistics (m, s, e, zt), each (S, N) fp32, S = the number of vocabulary spans."""
    N, D = hidden.shape
    V = weight.shape[0]
    row_blocks = triton.cdiv(N, BLOCK_N)
    tiles = triton.cdiv(V, BLOCK_V)
    tiles_per_span = triton.cdiv(tiles, min(tiles, triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    S = triton.cdiv(tiles, tiles_per_span)
    m, s, e, zt = torch.empty((4, S, N), dtype=torch.float32, device=hidden.device)
    dot_f32, precision = _dot_settings(hidden)
    _forward_kernel[(row_blocks, S)](
        hidden, weight, targets, m, s, e, zt, N, V, D, tiles_per_span * BLOCK_V, float(temperature),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, WITH_ENTROPY=with_entropy,
        DOT_F32=dot_f32, PRECISION=precision, **_launch_options(hidden))
    return m, s, e if with_entropy else None, zt


def dlogits(hidden, weight_chunk, targets, lse, grad, temperature: float, v_offset: int, out: torch.Tensor):
    """Fill out (N, C) with (g/τ)·(onehot − softmax) for the C vocabulary rows in weight_chunk."""
    N, D = hidden.shape
    C = weight_chunk.shape[0]
    dot_f32, precision = _dot_settings(hidden)
    _dlogits_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_V))](
        hidden, weight_chunk, targets, lse, grad, out, N, C, D, v_offset, float(temperature),
        hidden.stride(0), hidden.stride(1), weight_chunk.stride(0), weight_chunk.stride(1), out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, DOT_F32=dot_f32, PRECISION=precision,
        **_launch_options(hidden))
    return out
