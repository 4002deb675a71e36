"""Log-probabilities of chosen tokens straight from hidden states: lm_head, log-softmax and gather fused.

For N rows h_i (the hidden state before each chosen token), the lm_head weight W (V × D), the chosen
tokens t_i and the sampling temperature τ (DESIGN.md, "The math": π_θ uses logits / τ):

    z_i    = h_i Wᵀ / τ                                          (V logits, never all stored at once)
    lse_i  = log Σ_v exp(z_iv) = m_i + log Σ_v exp(z_iv − m_i),   m_i = max_v z_iv
    logp_i = z_i,t_i − lse_i                                     (≤ 0)

The maximum and the sum are taken online, one vocabulary tile (or chunk) after another: each span
reports (m, Σ exp(z − m), z_t) and `combine` merges them by rescaling to the largest m.

Backward, for an upstream gradient g_i = ∂L/∂logp_i: ∂logp_i/∂z_iv = onehot(t_i)_v − p_iv, p = softmax(z),
and ∂z/∂(hWᵀ) = 1/τ, so

    dz_iv = (g_i / τ) · (onehot(t_i)_v − p_iv),     dh = dz W,     dW = dzᵀ h.

Two cases, decided when the forward runs:
- lm_head frozen (LoRA: W.requires_grad is False, h needs a gradient). dW is never needed, and

      dh_i = (g_i / τ) · E_i,     E_i = W_t_i − Σ_v p_iv W_v = (Σ_{v≠t} p_iv) W_t_i − Σ_{v≠t} p_iv W_v,

  where E does not depend on g: the forward accumulates Σ_{v≠t} exp(z_v − m) W_v beside the sum of
  the logsumexp, rescaled with it whenever m grows, and keeps E (N × D) for the backward, which is a
  row scaling. Forward plus backward is two products' worth of work (h Wᵀ and p W), the floor.
  The target's column is kept out of both sums, so 1 − p_t is a sum of positive terms, never a
  difference that cancels when p_t is near 1.
- lm_head trainable. The forward keeps only lse (N floats); the backward recomputes the logits one
  vocabulary chunk of C columns at a time and takes dh += dz_c W_c and dW_c = dz_cᵀ h: four products.

The gradient stays fp32 wherever it is small: dz (g/τ ≈ 1/2400 times p ≈ 1/151,936 is below fp16's
smallest subnormal) and every product that feeds a sum over chunks are fp32, whatever the inputs'
dtype; only the final dh and dW are cast to it. logp is returned in fp32.

Memory: C is chosen so that N·C stays under WORKSPACE floats, so at most one (N, C) chunk of logits
(or of dz) exists, whatever N and V are (the naive log_softmax(h Wᵀ) holds several N×V tensors: 2.5 GB
each in fp32 at N = 4,096 and V = 151,936), plus a few (N, D) fp32 buffers.

Two paths compute the same numbers:
- Triton (triton_logprobs.py): CUDA tensors, and CPU tensors when the Triton interpreter is on
  (TRITON_INTERPRET=1 set before triton was first imported), as the tests run it;
- PyTorch: every other case, or with use_triton=False. It walks the same vocabulary chunks with plain
  torch ops, forward and backward, so its memory bound is the same. Triton need not be installed.
"""

import functools
import math
import numbers
import os
import warnings

import torch

from minirl.errors import InputError

WORKSPACE = 2**23  # floats of logits (or their gradient) held at once: 32 MiB in fp32
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The PyTorch path shifts by a stale maximum until a chunk's exceeds it by this much: exp(z − m) ≤ e⁸
# is far from fp32's range, and the (N, D) accumulator is then rescaled a few times, not every chunk.
LAZY_MAX = 8.0


def gathered_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      use_triton: bool | None = None) -> torch.Tensor:
    """logp[i] = log_softmax(hidden @ weight.T / temperature)[i, targets[i]], without an N×V tensor.

    hidden (N, D) and weight (V, D) share a float dtype (fp32, bf16 or fp16) and a device; any strides.
    targets (N,) integer token ids in [0, V). Returns logp (N,) fp32, differentiable in hidden and
    weight. use_triton: None picks the Triton kernels where they can run, False forces the PyTorch
    path, True requires the kernels.
    """
    hidden, weight, targets = _checked(hidden, weight, targets, temperature)
    if hidden.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device)
    grad = torch.is_grad_enabled()
    dh_in_forward = grad and hidden.requires_grad and not weight.requires_grad
    return GatheredLogprobs.apply(hidden, weight, targets, float(temperature),
                                  backend(hidden.device, use_triton) == "triton", dh_in_forward)


def backend(device: torch.device, use_triton: bool | None = None) -> str:
    """'triton' or 'torch': the path gathered_logprobs takes for tensors on `device`."""
    if use_triton is False:
        return "torch"
    can = (torch.device(device).type == "cuda" or _interpreting()) and _triton_module() is not None
    if use_triton and not can:
        raise InputError(f"use_triton=True, but the Triton kernels cannot run on {device} here (they need "
                         f"CUDA, or TRITON_INTERPRET=1 set before triton is imported, and triton installed)")
    return "triton" if can else "torch"


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False  # decided without importing triton
    module = _triton_module()
    return module is not None and module.INTERPRETED  # the kernels were decorated in interpreter mode


@functools.cache
def _triton_module():
    """The kernels module, or None where Triton is missing (optional at run time) or unusable."""
    try:
        from minirl.kernels import triton_logprobs
    except ImportError as e:
        if not (isinstance(e, ModuleNotFoundError) and e.name == "triton"):
            # One line, no source echo: the reason (often too old a Triton) and what happens instead.
            warnings.warn_explicit(f"{e}; gathered_logprobs takes the PyTorch path", RuntimeWarning,
                                   "minirl.kernels", 0)
        return None
    return triton_logprobs


def _checked(hidden, weight, targets, temperature):
    """Every check before a launch; returns targets as a contiguous int64 tensor."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 2:
        raise InputError(f"hidden: expected shape (N, D), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise InputError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    N, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise InputError(f"weight: expected shape (V, {D}) to match hidden (N, D) = {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if V == 0 or D == 0:
        raise InputError(f"weight: expected a non-empty (V, D) matrix, got {tuple(weight.shape)}")
    if targets.shape != (N,):
        raise InputError(f"targets: expected shape ({N},), one token per row of hidden, got {tuple(targets.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise InputError(f"hidden: dtype {hidden.dtype} is not supported, expected float32, bfloat16 or float16")
    if weight.dtype != hidden.dtype:
        raise InputError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one of them")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise InputError(f"targets: dtype {targets.dtype}, expected an integer dtype (token ids)")
    for name, x in (("weight", weight), ("targets", targets)):
        if x.device != hidden.device:
            raise InputError(f"{name}: on device {x.device}, but hidden is on {hidden.device}; expected one device")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(float(temperature)) or temperature <= 0:
        raise InputError(f"temperature: expected a finite number > 0, got {temperature!r}")
    bad = (targets < 0) | (targets >= V)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InputError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {V})")
    return hidden, weight, targets.to(torch.int64).contiguous()


class GatheredLogprobs(torch.autograd.Function):
    """(hidden, weight, targets, τ, use_triton, dh_in_forward) -> logp; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, use_triton, dh_in_forward):
        stats = _triton_module().forward_stats if use_triton else _torch_forward_stats
        m, s, zt, so, a = stats(hidden, weight, targets, temperature, dh_in_forward, WORKSPACE)
        w_t = weight[targets].float() if dh_in_forward else None  # (N, D) the targets' rows
        logp, lse, e = combine(m, s, zt, so, a, w_t)
        ctx.temperature, ctx.use_triton, ctx.dh_in_forward = temperature, use_triton, dh_in_forward
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(*((e,) if dh_in_forward else (hidden, weight, targets, lse)))
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        g = grad_logp.float() / ctx.temperature  # (N,) g/τ, applied after the products, in fp32
        if ctx.dh_in_forward:
            (e,) = ctx.saved_tensors
            return (g[:, None] * e).to(ctx.hidden_dtype), None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        N, D = hidden.shape
        V = weight.shape[0]
        dh = torch.zeros((N, D), dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        h = hidden.float()  # (N, D), converted once rather than per chunk
        C = chunk_width(N, V)
        workspace = chunk_workspace(N, C, hidden.device)
        h_tau = None if ctx.use_triton else h / ctx.temperature
        chunks = None if ctx.use_triton else _targets_by_chunk(targets, V, C)
        for k, c0 in enumerate(range(0, V, C)):
            w_c = weight[c0:c0 + C]  # (C, D)
            dz = workspace(w_c.shape[0])  # (N, C) fp32
            if ctx.use_triton:
                _triton_module().dlogits(hidden, w_c, targets, lse, grad_logp.float().contiguous(),
                                         ctx.temperature, c0, dz)
            else:
                _torch_dlogits(h_tau, w_c.float(), lse, g, *chunks[k], dz)
            if need_h:
                dh.addmm_(dz, w_c.float())  # (N, D) += (N, C) @ (C, D), fp32
            if need_w:
                dw[c0:c0 + C] = (dz.T @ h).to(weight.dtype)  # (C, D): each chunk's rows are final here
        return (dh.to(hidden.dtype) if need_h else None), dw, None, None, None, None


def combine(m, s, zt, so=None, a=None, w_t=None):
    """Merge per-span statistics, each (S, N), and a (S, N, D): returns (logp, lse, E or None), E (N, D)
    written over w_t (N, D), the targets' rows of W in fp32."""
    M = m.amax(dim=0)  # (N,)
    scale = torch.exp(m - M)  # (S, N): brings every span's sums to the common max
    total = (s * scale).sum(dim=0)  # Σ_v exp(z_v − M) ≥ 1: the span holding the max contributes exp(0)
    lse = M + torch.log(total)
    logp = zt.sum(dim=0) - lse  # z_t is non-zero in exactly one span
    if a is None:
        return logp, lse, None
    others = (so * scale).sum(dim=0)  # (N,) Σ_{v≠t} exp(z_v − M)
    weighted = torch.einsum("sn,snd->nd", scale, a)  # (N, D) Σ_{v≠t} exp(z_v − M) W_v
    e = w_t.mul_(others[:, None]).sub_(weighted).div_(total[:, None])  # (N, D) W_t − Σ_v p_v W_v, in w_t's place
    return logp, lse, e


def chunk_width(N: int, V: int) -> int:
    """Vocabulary columns per chunk: N·C ≤ WORKSPACE, at least 128 columns, at most V."""
    return min(V, max(128, WORKSPACE // max(N, 1)))


def chunk_workspace(N: int, C: int, device):
    """One fp32 (N, C) buffer for every chunk: `view(width)` is its first N·width elements as (N, width).

    Reusing it, rather than allocating each chunk's logits anew, matters on the CPU: a fresh 32 MiB
    block comes from the kernel as untouched pages, and faulting them in costs about a fifth of the
    chunk's matmul.
    """
    flat = torch.empty(N * C, dtype=torch.float32, device=device)
    views = {}  # every chunk but the last has the same width: one view, made once
    return lambda width: views.get(width) if width in views else views.setdefault(width, flat[:N * width].view(N, width))


def _targets_by_chunk(targets, V: int, C: int) -> list:
    """[(rows, cols)] per vocabulary chunk: the rows whose target falls in [c0, c0 + C), and its column
    there. Sorted once, with one host synchronisation, rather than searched for in every chunk."""
    order = targets.argsort()  # (N,)
    ordered = targets[order]
    bounds = torch.searchsorted(ordered, torch.arange(0, V + C, C, device=targets.device)).tolist()
    return [(order[bounds[k]:bounds[k + 1]], ordered[bounds[k]:bounds[k + 1]] - c0)
            for k, c0 in enumerate(range(0, V, C))]


def _torch_forward_stats(hidden, weight, targets, temperature, with_dh, max_floats):
    """The PyTorch path of the forward, one vocabulary chunk after another with an online (lazy) max:
    (m, s, zt, so, a) as one span, S = 1, in the layout of triton_logprobs.forward_stats.

    Everything here is fp32, so the target's column need not be kept out of the sums (that is for the
    Triton path's rounded p): with so = s, combine's E = W_t − a/s has the fp32 reference's rounding."""
    N, D = hidden.shape
    V = weight.shape[0]
    C = chunk_width(N, V)
    workspace = chunk_workspace(N, C, hidden.device)
    h = hidden.float() / temperature  # (N, D): 1/τ folded into the rows, one N×D op instead of one per chunk
    m = torch.full((N,), float("-inf"), device=hidden.device)
    s, zt = torch.zeros((2, N), device=hidden.device)
    a = torch.zeros((N, D), device=hidden.device) if with_dh else None
    # At small shapes the ops' own overhead rivals a chunk's arithmetic: nothing below is recomputed
    # per chunk that changes only when m does.
    m_col, m_lazy = m[:, None], m + LAZY_MAX
    for c0, (rows, cols) in zip(range(0, V, C), _targets_by_chunk(targets, V, C)):
        w_c = weight[c0:c0 + C].float()  # (C, D), a view for fp32
        z = torch.matmul(h, w_c.T, out=workspace(w_c.shape[0]))  # (N, C) logits
        zt[rows] = z[rows, cols]
        grown = z.amax(dim=1) > m_lazy  # (N,) all True on the first chunk; amax: max also finds indices
        if bool(grown.any()):
            m_new = torch.where(grown, z.amax(dim=1), m)
            scale = torch.exp(m - m_new)  # 1 where m stays, 0 on the first chunk
            s.mul_(scale)
            if with_dh:
                a.mul_(scale[:, None])
            m = m_new
            m_col, m_lazy = m[:, None], m + LAZY_MAX
        p = z.sub_(m_col).exp_()  # (N, C) exp(z − m) ≤ e^LAZY_MAX, in place: one buffer
        s += p.sum(dim=1)
        if with_dh:
            a.addmm_(p, w_c)  # (N, D) += (N, C) @ (C, D): the second product, in the forward
    return m[None], s[None], zt[None], (s[None] if with_dh else None), (a[None] if with_dh else None)


def _torch_dlogits(h, weight_chunk, lse, g, rows, cols, dz):
    """Writes (g/τ)·(onehot − softmax) for one vocabulary chunk into dz, (N, C) fp32; h (N, D) is
    hidden/τ and weight_chunk (C, D) fp32, g (N,) already divided by τ, (rows, cols) its targets."""
    torch.matmul(h, weight_chunk.T, out=dz)  # (N, C) logits, then in place:
    dz.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # −(g/τ)·softmax
    dz[rows, cols] += g[rows]
