"""Log-probabilities of chosen tokens straight from hidden states: lm_head, log-softmax and gather fused.

For N rows h_i (the hidden state before each chosen token), the lm_head weight W (V × D), the chosen
tokens t_i and the sampling temperature τ (DESIGN.md, "The math": π_θ uses logits / τ):

    z_i    = h_i Wᵀ / τ                                          (V logits, never all stored at once)
    lse_i  = log Σ_v exp(z_iv) = m_i + log Σ_v exp(z_iv − m_i),   m_i = max_v z_iv
    logp_i = z_i,t_i − lse_i                                     (≤ 0)
    H_i    = lse_i − Σ_v softmax(z_i)_v · z_iv                   (entropy, optional, for logging only)

The maximum and the sum are taken online, one vocabulary tile (or span) after another: each span
reports (m, Σ exp(z − m), Σ exp(z − m)·z, z_t) and `combine` merges them by rescaling to the largest
m. The forward keeps only lse (N floats) for the backward.

Backward, for an upstream gradient g_i = ∂L/∂logp_i: ∂logp_i/∂z_iv = onehot(t_i)_v − softmax(z_i)_v and
∂z/∂(hWᵀ) = 1/τ, so

    dz_iv = (g_i / τ) · (onehot(t_i)_v − exp(z_iv − lse_i)),     dh = dz W,     dW = dzᵀ h.

The logits are recomputed one vocabulary chunk of C columns at a time, C chosen so that N·C stays
under WORKSPACE floats: the backward never holds more than one (N, C) chunk of dz, whatever N and V
are (the naive log_softmax(h Wᵀ) holds several N×V tensors: 2.5 GB each in fp32 at N = 4,096 and
V = 151,936). Accumulation is fp32 for fp32, bf16 and fp16 inputs; logp is returned in fp32.

Two paths compute the same numbers:
- Triton (triton_logprobs.py): CUDA tensors, and CPU tensors when the Triton interpreter is on
  (TRITON_INTERPRET=1 set before triton was first imported), as the tests run it;
- PyTorch: every other case, or always with MINIRL_LOGPROBS=torch. It walks the same vocabulary
  chunks with plain torch ops, forward and backward, so its memory bound is the same. Triton need
  not be installed for it.
"""

import functools
import math
import numbers
import os

import torch

from minirl.errors import InputError

WORKSPACE = 2**23  # floats of logits (or their gradient) held at once: 32 MiB in fp32
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gathered_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      return_entropy: bool = False):
    """logp[i] = log_softmax(hidden @ weight.T / temperature)[i, targets[i]], without an N×V tensor.

    hidden (N, D) and weight (V, D) share a float dtype (fp32, bf16 or fp16) and a device; any strides.
    targets (N,) integer token ids in [0, V). Returns logp (N,) fp32, differentiable in hidden and
    weight; with return_entropy=True returns (logp, entropy), the entropy (N,) fp32 not differentiable.
    """
    hidden, weight, targets = _checked(hidden, weight, targets, temperature)
    if hidden.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return (empty, empty.clone()) if return_entropy else empty
    out = GatheredLogprobs.apply(hidden, weight, targets, float(temperature), backend(hidden.device) == "triton",
                                 bool(return_entropy))
    return out if return_entropy else out[0]


def backend(device: torch.device) -> str:
    """'triton' or 'torch': the path gathered_logprobs takes for tensors on `device`."""
    choice = os.environ.get("MINIRL_LOGPROBS", "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise InputError(f"MINIRL_LOGPROBS is {choice!r}, expected 'auto', 'torch' or 'triton'")
    if choice == "torch":
        return "torch"
    triton_ok = torch.device(device).type == "cuda" or _interpreting()
    if choice == "triton" and not (triton_ok and _triton_module() is not None):
        raise InputError(f"MINIRL_LOGPROBS is 'triton', but Triton cannot run on {device} here "
                         "(it needs CUDA, or TRITON_INTERPRET=1 set before triton is imported, and triton installed)")
    return "triton" if triton_ok and _triton_module() is not None else "torch"


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False  # decided without importing triton
    module = _triton_module()
    return module is not None and module.INTERPRETED  # the kernels were decorated in interpreter mode


@functools.cache
def _triton_module():
    """The kernels module, or None where triton is not importable (Triton is optional at run time)."""
    try:
        from minirl.kernels import triton_logprobs
    except ImportError:
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
    """(hidden, weight, targets, τ, use_triton, with_entropy) -> (logp,) or (logp, entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, use_triton, with_entropy):
        if use_triton:
            m, s, e, zt = _triton_module().forward_stats(hidden, weight, targets, temperature, with_entropy)
        else:
            m, s, e, zt = _torch_forward_stats(hidden, weight, targets, temperature, with_entropy)
        logp, lse, entropy = combine(m, s, e, zt)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.use_triton = temperature, use_triton
        if not with_entropy:
            return (logp,)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        N, D = hidden.shape
        V = weight.shape[0]
        g = grad_logp.float().contiguous()  # (N,)
        dh = torch.zeros((N, D), dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        C = chunk_width(N, V)
        # On a GPU dz is written in the weight's dtype so that the products below run on tensor cores.
        dz_dtype = weight.dtype if ctx.use_triton and weight.is_cuda else torch.float32
        workspace = chunk_workspace(N, C, dz_dtype, hidden.device)
        for c0 in range(0, V, C):
            w_c = weight[c0:c0 + C]  # (C, D)
            dz = workspace(w_c.shape[0])  # (N, C)
            if ctx.use_triton:
                _triton_module().dlogits(hidden, w_c, targets, lse, g, ctx.temperature, c0, dz)
            else:
                _torch_dlogits(hidden, w_c, targets, lse, g, ctx.temperature, c0, dz)
            if need_h:
                dh += _matmul_f32(dz, w_c)  # (N, D)
            if need_w:
                dw[c0:c0 + C] = _matmul_f32(dz.T, hidden).to(weight.dtype)  # (C, D)
        return (dh.to(hidden.dtype) if need_h else None), dw, None, None, None, None


def combine(m, s, e, zt):
    """Merge per-span statistics, each (S, N): (logp, lse, entropy or None), each (N,)."""
    M = m.amax(dim=0)  # (N,)
    scale = torch.exp(m - M)  # (S, N): brings every span's sums to the common max
    total = (s * scale).sum(dim=0)  # Σ_v exp(z_v − M) ≥ 1: the span holding the max contributes exp(0)
    lse = M + torch.log(total)
    logp = zt.sum(dim=0) - lse  # z_t is non-zero in exactly one span
    entropy = None if e is None else lse - (e * scale).sum(dim=0) / total
    return logp, lse, entropy


def chunk_width(N: int, V: int) -> int:
    """Vocabulary columns per chunk: N·C ≤ WORKSPACE, at least 128 columns, at most V."""
    return min(V, max(128, WORKSPACE // max(N, 1)))


def chunk_workspace(N: int, C: int, dtype, device):
    """One (N, C) buffer for every chunk: `view(width)` is its first N·width elements as (N, width).

    Reusing it, rather than allocating each chunk's logits anew, matters on the CPU: a fresh 32 MiB
    block comes from the kernel as untouched pages, and faulting them in costs about a fifth of the
    chunk's matmul.
    """
    flat = torch.empty(N * C, dtype=dtype, device=device)
    return lambda width: flat[:N * width].view(N, width)


def _torch_forward_stats(hidden, weight, targets, temperature, with_entropy):
    """The PyTorch path of the forward: one span per vocabulary chunk, statistics stacked to (S, N)."""
    N = hidden.shape[0]
    C = chunk_width(N, weight.shape[0])
    workspace = chunk_workspace(N, C, torch.float32, hidden.device)
    h = hidden.float()  # (N, D)
    stats = []
    for c0 in range(0, weight.shape[0], C):
        w_c = weight[c0:c0 + C].float()  # (C, D)
        z = torch.matmul(h, w_c.T, out=workspace(w_c.shape[0])).div_(temperature)  # (N, C)
        inside = (targets >= c0) & (targets < c0 + z.shape[1])
        zt = torch.where(inside, z.gather(1, (targets - c0).clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
        m = z.amax(dim=1)  # amax, not max: max also finds the indices, several times slower on the CPU
        if with_entropy:
            p = torch.exp(z - m[:, None])
            s, e = p.sum(dim=1), p.mul_(z).sum(dim=1)
        else:
            s, e = z.sub_(m[:, None]).exp_().sum(dim=1), None  # in place: one (N, C) buffer
        stats.append((m, s, e, zt))
    m, s, e, zt = (None if parts[0] is None else torch.stack(parts) for parts in zip(*stats))
    return m, s, e, zt


def _torch_dlogits(hidden, weight_chunk, targets, lse, g, temperature, c0, dz):
    """Writes (g/τ)·(onehot − softmax) for the vocabulary columns [c0, c0 + C) into dz, (N, C) fp32."""
    C = weight_chunk.shape[0]
    torch.matmul(hidden.float(), weight_chunk.float().T, out=dz).div_(temperature)  # (N, C) logits, then in place:
    dz.sub_(lse[:, None]).exp_().mul_(-(g / temperature)[:, None])  # −(g/τ)·softmax
    rows = ((targets >= c0) & (targets < c0 + C)).nonzero()[:, 0]
    dz[rows, targets[rows] - c0] += g[rows] / temperature


def _matmul_f32(a, b):
    """a @ b as fp32 with fp32 accumulation; a equal-dtype product when a already has b's dtype."""
    if a.dtype == b.dtype:
        return (a @ b).float()
    return a.float() @ b.float()
