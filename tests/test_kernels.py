"""gathered_logprobs against the naive log_softmax(h Wᵀ / τ).gather, on both of its paths.

The Triton path runs under TRITON_INTERPRET=1 (set by conftest.py); the PyTorch path is forced with
MINIRL_LOGPROBS=torch. `small_blocks` shrinks the Triton blocks, the forward's split target and the
backward's workspace so that small shapes still cross row-block, tile, span and chunk boundaries.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from minirl.errors import InputError
from minirl.kernels import fused_logprobs, gathered_logprobs, triton_logprobs

PATHS = ("triton", "torch")


def naive(h, w, t, tau):
    """The reference: every logit, log-softmax, gather."""
    logp = torch.log_softmax((h.float() @ w.float().T) / tau, dim=-1)  # (N, V)
    return logp.gather(1, t[:, None])[:, 0]


def naive_entropy(h, w, tau):
    logp = torch.log_softmax((h.float() @ w.float().T) / tau, dim=-1)  # (N, V)
    return -(logp.exp() * logp).sum(dim=-1)


@contextlib.contextmanager
def path(name):
    old = os.environ.get("MINIRL_LOGPROBS")
    os.environ["MINIRL_LOGPROBS"] = name
    try:
        yield
    finally:
        os.environ.pop("MINIRL_LOGPROBS") if old is None else os.environ.__setitem__("MINIRL_LOGPROBS", old)


@contextlib.contextmanager
def small_blocks(on=True):
    """Blocks of 16 rows × 32 columns × 16 features, 4-program forward splits, 128-column backward chunks."""
    saved = (triton_logprobs.BLOCK_N, triton_logprobs.BLOCK_V, triton_logprobs.BLOCK_D,
             triton_logprobs.TARGET_PROGRAMS, fused_logprobs.WORKSPACE)
    if on:
        triton_logprobs.BLOCK_N, triton_logprobs.BLOCK_V, triton_logprobs.BLOCK_D = 16, 32, 16
        triton_logprobs.TARGET_PROGRAMS, fused_logprobs.WORKSPACE = 4, 128
    try:
        yield
    finally:
        (triton_logprobs.BLOCK_N, triton_logprobs.BLOCK_V, triton_logprobs.BLOCK_D,
         triton_logprobs.TARGET_PROGRAMS, fused_logprobs.WORKSPACE) = saved


def inputs(N, D, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D**0.25).to(dtype)  # logits of a few units: a peaked softmax
    t = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return h, w, t, upstream


def value_and_grads(fn, h, w, t, tau, upstream, grad_w=True):
    """fn's output and the gradients of Σ upstream · output w.r.t. h and w."""
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(grad_w)
    out = fn(h, w, t, tau)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def run(name, h, w, t, tau, upstream, grad_w=True):
    with path(name):
        return value_and_grads(gathered_logprobs, h, w, t, tau, upstream, grad_w)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 40), D=st.integers(1, 64), V=st.integers(1, 300), tau=st.floats(0.25, 3.0),
       small=st.booleans(), name=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_fp32_values_and_gradients_match_the_naive_reference(N, D, V, tau, small, name, seed):
    h, w, t, upstream = inputs(N, D, V, seed)
    with small_blocks(small):
        ours = run(name, h, w, t, tau, upstream)
    expected = value_and_grads(naive, h, w, t, tau, upstream)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, D, V", [(1, 8, 5), (37, 48, 211), (16, 64, 128)])
def test_half_precision_inputs_accumulate_in_fp32(name, dtype, N, D, V):
    h, w, t, upstream = inputs(N, D, V, seed=N + V, dtype=dtype)
    with small_blocks(N > 1):
        logp, dh, dw = run(name, h, w, t, 0.7, upstream)
    ref, ref_dh, ref_dw = value_and_grads(naive, h.float(), w.float(), t, 0.7, upstream)
    assert logp.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    # The logits of rounded inputs are exact in fp32, so logp is tight; the gradients come back rounded.
    torch.testing.assert_close(logp, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dh.float(), ref_dh, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dw.float(), ref_dw, atol=1e-2, rtol=1e-2)


@settings(max_examples=20, deadline=None)
@given(D=st.integers(1, 64), V=st.integers(1, 300), tau=st.floats(0.25, 3.0), name=st.sampled_from(PATHS),
       seed=st.integers(0, 2**16))
def test_one_row_is_a_distribution_over_the_vocabulary(D, V, tau, name, seed):
    h, w, _, _ = inputs(1, D, V, seed)
    with path(name), small_blocks():
        logp = gathered_logprobs(h.expand(V, D), w, torch.arange(V), tau)  # the row against every token
    assert bool((logp <= 0).all())
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", PATHS)
def test_permuting_rows_permutes_the_result(name):
    h, w, t, upstream = inputs(37, 24, 150, seed=3)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    with small_blocks():
        logp, dh, dw = run(name, h, w, t, 1.3, upstream)
        p_logp, p_dh, p_dw = run(name, h[perm], w, t[perm], 1.3, upstream[perm])
    torch.testing.assert_close(p_logp, logp[perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p_dh, dh[perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p_dw, dw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("small", [False, True])
def test_triton_and_pytorch_paths_agree(small):
    h, w, t, upstream = inputs(40, 64, 300, seed=11)
    with small_blocks(small):
        a = run("triton", h, w, t, 0.3, upstream)
        b = run("torch", h, w, t, 0.3, upstream)
        with path("triton"):
            ent_a = gathered_logprobs(h, w, t, 0.3, return_entropy=True)[1]
        with path("torch"):
            ent_b = gathered_logprobs(h, w, t, 0.3, return_entropy=True)[1]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, atol=1e-4, rtol=1e-4)  # lse − E[z]: cancels when one token dominates


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("N, D, V", [(1, 3, 2), (29, 40, 257)])
def test_entropy_matches_the_reference_and_is_not_differentiable(name, N, D, V):
    h, w, t, _ = inputs(N, D, V, seed=5)
    h.requires_grad_(True)
    with path(name), small_blocks():
        logp, entropy = gathered_logprobs(h, w, t, 0.8, return_entropy=True)
    torch.testing.assert_close(logp, naive(h, w, t, 0.8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy(h, w, 0.8), atol=1e-4, rtol=1e-4)
    assert logp.requires_grad and not entropy.requires_grad


@pytest.mark.parametrize("name", PATHS)
def test_gradient_only_where_asked(name):
    h, w, t, upstream = inputs(20, 16, 90, seed=7)
    logp, dh, dw = run(name, h, w, t, 1.0, upstream, grad_w=False)
    assert dw is None
    torch.testing.assert_close(dh, value_and_grads(naive, h, w, t, 1.0, upstream)[1], atol=1e-5, rtol=1e-5)
    wg = w.clone().requires_grad_(True)
    with path(name):
        (gathered_logprobs(h, wg, t) * upstream).sum().backward()  # hidden without grad: dW alone
    torch.testing.assert_close(wg.grad, value_and_grads(naive, h, w, t, 1.0, upstream)[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PATHS)
def test_any_strides(name):
    h, w, t, upstream = inputs(12, 20, 70, seed=9)
    h_base = torch.zeros(20, 24)
    h_base[:, :12] = h.T
    w_base = w.T.contiguous()  # (20, 70): its transpose is w, column-major
    h_base.requires_grad_(True)
    w_base.requires_grad_(True)
    h_view, w_view, t_view = h_base[:, :12].T, w_base.T, torch.stack([t, t], dim=1)[:, 0]
    assert not (h_view.is_contiguous() or w_view.is_contiguous() or t_view.is_contiguous())
    with path(name):
        logp = gathered_logprobs(h_view, w_view, t_view, 0.9)
    (logp * upstream).sum().backward()
    ref, ref_dh, ref_dw = value_and_grads(naive, h, w, t, 0.9, upstream)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_base.grad[:, :12].T, ref_dh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_base.grad.T, ref_dw, atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, that any op returns (the interpreter's copies of arguments too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


@pytest.mark.parametrize("name", PATHS)
def test_no_tensor_of_n_times_v_elements(name):
    N, D, V = 40, 16, 1000
    h, w, t, upstream = inputs(N, D, V, seed=1)
    h.requires_grad_(True)
    w.requires_grad_(True)
    saved = fused_logprobs.WORKSPACE
    fused_logprobs.WORKSPACE = N * 128  # chunks of 128 columns
    try:
        with path(name), LargestTensor() as seen:
            (gathered_logprobs(h, w, t, 0.5) * upstream).sum().backward()
    finally:
        fused_logprobs.WORKSPACE = saved
    assert seen.largest <= 4 * max(N * 128, V * D) < 4 * N * V  # a chunk of dz, or W and dW themselves
    with LargestTensor() as seen_naive:
        (naive(h, w, t, 0.5) * upstream).sum().backward()
    assert seen_naive.largest >= 4 * N * V  # the probe does see the naive reference's logits


def test_no_rows_give_an_empty_result():
    logp, entropy = gathered_logprobs(torch.zeros(0, 8), torch.randn(5, 8), torch.zeros(0, dtype=torch.long),
                                      return_entropy=True)
    assert logp.shape == entropy.shape == (0,)


@pytest.mark.parametrize("bad, index", [([0, 4, -1, 2, -3], 2), ([0, 1, 2, 9, 11], 3), ([5, 0, 0, 0, 0], 0)])
def test_a_bad_target_is_an_error_naming_its_index(bad, index):
    h, w, _, _ = inputs(5, 8, 5, seed=0)
    for name in PATHS:
        with path(name), pytest.raises(InputError, match=rf"targets\[{index}\] = {bad[index]} .*\[0, 5\)"):
            gathered_logprobs(h, w, torch.tensor(bad))


@pytest.mark.parametrize("args, message", [
    (lambda h, w, t: (h[None], w, t), r"hidden: expected shape \(N, D\)"),
    (lambda h, w, t: (h, w[:, :7], t), r"weight: expected shape \(V, 8\)"),
    (lambda h, w, t: (h, w, t[:3]), r"targets: expected shape \(5,\)"),
    (lambda h, w, t: (h, w.double(), t), r"weight: dtype torch.float64 differs"),
    (lambda h, w, t: (h.double(), w.double(), t), r"hidden: dtype torch.float64 is not supported"),
    (lambda h, w, t: (h, w, t.float()), r"targets: dtype torch.float32"),
    (lambda h, w, t: (h, w.to("meta"), t), r"weight: on device meta, but hidden is on cpu"),
    (lambda h, w, t: (h, w, t.to("meta")), r"targets: on device meta"),
    (lambda h, w, t: (h, w, t.tolist()), r"targets: expected a torch.Tensor"),
    (lambda h, w, t: (h, w[:0], t), r"weight: expected a non-empty"),
])
def test_malformed_inputs_are_clear_errors(args, message):
    h, w, t, _ = inputs(5, 8, 5, seed=0)
    with pytest.raises(InputError, match=message):
        gathered_logprobs(*args(h, w, t))


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_temperature_must_be_a_positive_number(tau):
    h, w, t, _ = inputs(5, 8, 5, seed=0)
    with pytest.raises(InputError, match="temperature: expected a finite number > 0"):
        gathered_logprobs(h, w, t, tau)


def test_dispatch_and_its_override():
    cpu = torch.device("cpu")
    with path("auto"):
        assert fused_logprobs.backend(cpu) == "triton"  # conftest turned the interpreter on
    with path("torch"):
        assert fused_logprobs.backend(cpu) == "torch"
    with path("fast"), pytest.raises(InputError, match="MINIRL_LOGPROBS is 'fast'"):
        fused_logprobs.backend(cpu)


def test_pytorch_path_without_triton_installed():
    """In a fresh process where `import triton` fails, the PyTorch path runs, and is right."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from minirl.kernels import fused_logprobs, gathered_logprobs\n"
        "h, w = torch.randn(6, 8, dtype=torch.float64).float(), torch.randn(30, 8)\n"
        "t = torch.randint(0, 30, (6,))\n"
        "ref = torch.log_softmax(h @ w.T / 0.5, -1).gather(1, t[:, None])[:, 0]\n"
        "err = float((gathered_logprobs(h, w, t, 0.5) - ref).abs().max())\n"
        "print(fused_logprobs.backend(torch.device('cpu')), 'minirl.kernels.triton_logprobs' in sys.modules, err)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "MINIRL_LOGPROBS": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    used, imported, err = out.split()
    assert used == "torch" and imported == "False" and float(err) < 1e-5
