"""gathered_logprobs against the naive log_softmax(h Wᵀ / τ).gather and hand-written gradients, on both paths.

The Triton path runs under TRITON_INTERPRET=1 (set by conftest.py); the PyTorch path is forced with
use_triton=False. Every gradient test runs twice: lm_head trainable (the backward recomputes the logits)
and frozen (the forward accumulates dh's product, the backward only scales it). `small_blocks` shrinks
the Triton blocks, the forward's split target and the backward's workspace so that small shapes still
cross row-block, tile, span and chunk boundaries.
"""

import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from minirl.errors import InputError
from minirl.kernels import fused_logprobs, gathered_logprobs, triton_logprobs

PATHS = ("triton", "torch")
GRAD_W = pytest.mark.parametrize("grad_w", [True, False], ids=["trainable", "frozen"])


def naive(h, w, t, tau):
    """The reference: every logit, log-softmax, gather."""
    logp = torch.log_softmax((h.float() @ w.float().T) / tau, dim=-1)  # (N, V)
    return logp.gather(1, t[:, None])[:, 0]


def hand_grads(h, w, t, tau, upstream):
    """dh = (g/τ)(W[t] − Σ_v p_v W_v) and dW = dzᵀ h, dz = (g/τ)(onehot(t) − p), in float64 from the formulas."""
    h, w, g = h.double(), w.double(), upstream.double() / tau
    p = torch.softmax(h @ w.T / tau, dim=-1)  # (N, V)
    dh = g[:, None] * (w[t] - p @ w)  # (N, D)
    dz = -g[:, None] * p
    dz[torch.arange(len(t)), t] += g
    return dh.float(), (dz.T @ h).float()  # (N, D), (V, D)


@contextlib.contextmanager
def small_blocks(on=True, workspace=128):
    """Blocks of 16 rows × 32 columns × 16 features, 4-program forward splits, `workspace`-float chunks."""
    saved = (triton_logprobs.BLOCK_N, triton_logprobs.BLOCK_V, triton_logprobs.BLOCK_D,
             triton_logprobs.TARGET_PROGRAMS, fused_logprobs.WORKSPACE)
    if on:
        triton_logprobs.BLOCK_N, triton_logprobs.BLOCK_V, triton_logprobs.BLOCK_D = 16, 32, 16
        triton_logprobs.TARGET_PROGRAMS, fused_logprobs.WORKSPACE = 4, workspace
    try:
        yield
    finally:
        (triton_logprobs.BLOCK_N, triton_logprobs.BLOCK_V, triton_logprobs.BLOCK_D,
         triton_logprobs.TARGET_PROGRAMS, fused_logprobs.WORKSPACE) = saved


@contextlib.contextmanager
def workspace(floats):
    """Only the chunk workspace (and the frozen forward's accumulator bound) made small."""
    saved, fused_logprobs.WORKSPACE = fused_logprobs.WORKSPACE, floats
    try:
        yield
    finally:
        fused_logprobs.WORKSPACE = saved


def inputs(N, D, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D**0.25).to(dtype)  # logits of a few units: a peaked softmax
    t = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return h, w, t, upstream


def value_and_grads(fn, h, w, t, tau, upstream, grad_w=True):
    """fn's output and the gradients of Σ upstream · output w.r.t. h and w (None for w if frozen)."""
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(grad_w)
    out = fn(h, w, t, tau)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def ours(name):
    return lambda h, w, t, tau: gathered_logprobs(h, w, t, tau, use_triton=name == "triton")


def run(name, h, w, t, tau, upstream, grad_w=True):
    return value_and_grads(ours(name), h, w, t, tau, upstream, grad_w)


def check_fp32(got, h, w, t, tau, upstream, grad_w, atol=2e-5, rtol=1e-4):
    """got = (logp, dh, dw) against autograd through the naive reference and against hand_grads."""
    expected = value_and_grads(naive, h, w, t, tau, upstream, grad_w)
    hand_dh, hand_dw = hand_grads(h, w, t, tau, upstream)
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], expected[1], atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], hand_dh, atol=atol, rtol=rtol)
    if grad_w:
        torch.testing.assert_close(got[2], expected[2], atol=atol, rtol=rtol)
        torch.testing.assert_close(got[2], hand_dw, atol=atol, rtol=rtol)
    else:
        assert got[2] is None and expected[2] is None


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 40), D=st.integers(1, 64), V=st.integers(1, 300), tau=st.floats(0.25, 3.0),
       small=st.booleans(), name=st.sampled_from(PATHS), grad_w=st.booleans(), seed=st.integers(0, 2**16))
def test_fp32_values_and_gradients_match_the_references(N, D, V, tau, small, name, grad_w, seed):
    h, w, t, upstream = inputs(N, D, V, seed)
    with small_blocks(small):
        got = run(name, h, w, t, tau, upstream, grad_w)
    check_fp32(got, h, w, t, tau, upstream, grad_w)


@pytest.mark.parametrize("name", PATHS)
@GRAD_W
def test_a_maximum_that_grows_chunk_after_chunk(name, grad_w):
    """Rows of W whose norm grows with the token id: every chunk (and tile) raises each row's maximum by
    more than LAZY_MAX, so the sums and the frozen path's (N, D) accumulator are rescaled again and again."""
    h, w, t, upstream = inputs(24, 16, 600, seed=4)
    w = w * torch.linspace(0.1, 12.0, 600)[:, None]
    with small_blocks(workspace=24 * 128):
        got = run(name, h, w, t, 0.5, upstream, grad_w)
    check_fp32(got, h, w, t, 0.5, upstream, grad_w, atol=1e-4, rtol=1e-4)


# Tolerance of a half-precision result against fp32 on the same (rounded) inputs: HALF_FACTOR × eps of the
# dtype, relative, and the same times the largest reference entry, absolute. The result's own rounding
# costs ½ eps; the Triton forward rounds p to the weight's dtype before its second product (another
# ½ eps at most: the shared component of W cancels exactly, see triton_logprobs.py); 4 leaves room.
HALF_FACTOR = 4


def check_half(got, h, w, t, tau, upstream, grad_w, dtype):
    ref, ref_dh, ref_dw = value_and_grads(naive, h.float(), w.float(), t, tau, upstream, grad_w)
    tol = HALF_FACTOR * torch.finfo(dtype).eps
    logp, dh, dw = got
    assert logp.dtype == torch.float32 and dh.dtype == dtype
    # The logits of rounded inputs are exact in fp32, so logp is tight; the gradients come back rounded.
    torch.testing.assert_close(logp, ref, atol=1e-4, rtol=1e-4)
    hand_dh, hand_dw = hand_grads(h, w, t, tau, upstream)
    for ref in (ref_dh, hand_dh):
        torch.testing.assert_close(dh.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    if grad_w:
        assert dw.dtype == dtype
        for ref in (ref_dw, hand_dw):
            torch.testing.assert_close(dw.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, D, V", [(1, 8, 5), (37, 48, 211), (16, 64, 128)])
@GRAD_W
def test_half_precision_inputs_accumulate_in_fp32(name, dtype, N, D, V, grad_w):
    h, w, t, upstream = inputs(N, D, V, seed=N + V, dtype=dtype)
    with small_blocks(N > 1):
        got = run(name, h, w, t, 0.7, upstream, grad_w)
    check_half(got, h, w, t, 0.7, upstream, grad_w, dtype)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@GRAD_W
def test_half_precision_gradients_do_not_underflow(name, dtype, grad_w):
    """Built to underflow a gradient of the logits stored in half precision: a large vocabulary (p_v ≈ 1/V),
    the upstream gradient of a mean over 8 × 300 tokens, and lm_head rows that share a large common
    direction (as real ones do), so that dh = (g/τ)(W[t] − Σ p_v W_v) is a small difference of large terms:
    g·p_v ≈ 5e-8 is one fp16 subnormal step (6e-8), and g·W[t] is about 50 times dh, so rounding
    g·(1 − p_t) or a chunk's partial product to bf16 costs about 10 eps. 32 chunks in the backward."""
    N, D, V = 8, 16, 8192
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(dtype)
    w = (16 * torch.randn(D, generator=gen) + 0.1 * torch.randn(V, D, generator=gen)).to(dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.full((N,), 1 / (8 * 300))
    with workspace(N * 256):
        got = run(name, h, w, t, 1.0, upstream, grad_w)
    check_half(got, h, w, t, 1.0, upstream, grad_w, dtype)


class Ops(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", PATHS)
def test_frozen_weight_backward_multiplies_nothing(name):
    """lm_head frozen: both products run in the forward, the backward is a row scaling (no matmul, and on
    the Triton path no kernel: the interpreter would show up as copies of the arguments)."""
    h, w, t, upstream = inputs(20, 16, 300, seed=2)
    h.requires_grad_(True)
    with small_blocks():
        logp = gathered_logprobs(h, w, t, 0.8, use_triton=name == "triton")
        with Ops() as seen:
            (logp * upstream).sum().backward()
    products = [n for n in seen.names if any(k in n for k in ("mm", "matmul", "dot", "linear"))]
    assert products == [] and len(seen.names) < 12, seen.names
    w.requires_grad_(True)
    with small_blocks(), Ops() as trainable:
        (gathered_logprobs(h, w, t, 0.8, use_triton=name == "triton") * upstream).sum().backward()
    assert len(trainable.names) > 3 * len(seen.names)  # the probe does see a backward that recomputes


@settings(max_examples=20, deadline=None)
@given(D=st.integers(1, 64), V=st.integers(1, 300), tau=st.floats(0.25, 3.0), name=st.sampled_from(PATHS),
       seed=st.integers(0, 2**16))
def test_one_row_is_a_distribution_over_the_vocabulary(D, V, tau, name, seed):
    h, w, _, _ = inputs(1, D, V, seed)
    with small_blocks():
        logp = ours(name)(h.expand(V, D), w, torch.arange(V), tau)  # the row against every token
    assert bool((logp <= 0).all())
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", PATHS)
@GRAD_W
def test_permuting_rows_permutes_the_result(name, grad_w):
    h, w, t, upstream = inputs(37, 24, 150, seed=3)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    with small_blocks():
        logp, dh, dw = run(name, h, w, t, 1.3, upstream, grad_w)
        p_logp, p_dh, p_dw = run(name, h[perm], w, t[perm], 1.3, upstream[perm], grad_w)
    torch.testing.assert_close(p_logp, logp[perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p_dh, dh[perm], atol=1e-6, rtol=1e-6)
    if grad_w:
        torch.testing.assert_close(p_dw, dw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("small", [False, True])
@GRAD_W
def test_triton_and_pytorch_paths_agree(small, grad_w):
    h, w, t, upstream = inputs(40, 64, 300, seed=11)
    with small_blocks(small):
        a = run("triton", h, w, t, 0.3, upstream, grad_w)
        b = run("torch", h, w, t, 0.3, upstream, grad_w)
    for x, y in zip(a, b):  # the PyTorch path divides h by τ before the product, Triton the logits after it
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PATHS)
def test_gradient_only_where_asked(name):
    h, w, t, upstream = inputs(20, 16, 90, seed=7)
    wg = w.clone().requires_grad_(True)
    (ours(name)(h, wg, t, 1.0) * upstream).sum().backward()  # hidden without grad: dW alone
    torch.testing.assert_close(wg.grad, value_and_grads(naive, h, w, t, 1.0, upstream)[2], atol=1e-5, rtol=1e-5)
    hg = h.clone().requires_grad_(True)
    with torch.no_grad():
        logp = ours(name)(hg, wg, t, 1.0)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, naive(h, w, t, 1.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PATHS)
@GRAD_W
def test_any_strides(name, grad_w):
    h, w, t, upstream = inputs(12, 20, 70, seed=9)
    h_base = torch.zeros(20, 24)
    h_base[:, :12] = h.T
    w_base = w.T.contiguous()  # (20, 70): its transpose is w, column-major
    h_base.requires_grad_(True)
    w_base.requires_grad_(grad_w)
    h_view, w_view, t_view = h_base[:, :12].T, w_base.T, torch.stack([t, t], dim=1)[:, 0]
    assert not (h_view.is_contiguous() or w_view.is_contiguous() or t_view.is_contiguous())
    logp = ours(name)(h_view, w_view, t_view, 0.9)
    (logp * upstream).sum().backward()
    ref, ref_dh, ref_dw = value_and_grads(naive, h, w, t, 0.9, upstream)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_base.grad[:, :12].T, ref_dh, atol=1e-5, rtol=1e-5)
    if grad_w:
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
@GRAD_W
def test_no_tensor_of_n_times_v_elements(name, grad_w):
    N, D, V = 40, 16, 1000
    h, w, t, upstream = inputs(N, D, V, seed=1)
    h.requires_grad_(True)
    w.requires_grad_(grad_w)
    with workspace(N * 128), LargestTensor() as seen:  # chunks of 128 columns
        (ours(name)(h, w, t, 0.5) * upstream).sum().backward()
    assert seen.largest <= 4 * max(N * 128, V * D) < 4 * N * V  # a chunk of dz, or W and dW themselves
    with LargestTensor() as seen_naive:
        (naive(h, w, t, 0.5) * upstream).sum().backward()
    assert seen_naive.largest >= 4 * N * V  # the probe does see the naive reference's logits


def test_no_rows_give_an_empty_result():
    logp = gathered_logprobs(torch.zeros(0, 8), torch.randn(5, 8), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)


@pytest.mark.parametrize("bad, index", [([0, 4, -1, 2, -3], 2), ([0, 1, 2, 9, 11], 3), ([5, 0, 0, 0, 0], 0)])
def test_a_bad_target_is_an_error_naming_its_index(bad, index):
    h, w, _, _ = inputs(5, 8, 5, seed=0)
    for name in PATHS:
        with pytest.raises(InputError, match=rf"targets\[{index}\] = {bad[index]} .*\[0, 5\)"):
            ours(name)(h, w, torch.tensor(bad), 1.0)


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
    assert fused_logprobs.backend(cpu) == "triton"  # conftest turned the interpreter on
    assert fused_logprobs.backend(cpu, use_triton=True) == "triton"
    assert fused_logprobs.backend(cpu, use_triton=False) == "torch"


def test_an_old_triton_falls_back_with_one_warning(monkeypatch):
    """A Triton older than MIN_TRITON (here one without triton.knobs, like 3.2): one RuntimeWarning naming
    the version, then the PyTorch path, right; asking for the kernels is then a clear error."""
    old = types.ModuleType("triton")
    old.__version__ = "3.0.0"
    monkeypatch.setitem(sys.modules, "triton", old)
    monkeypatch.delitem(sys.modules, "minirl.kernels.triton_logprobs")
    monkeypatch.delattr(sys.modules["minirl.kernels"], "triton_logprobs")  # else `from … import` finds it
    fused_logprobs._triton_module.cache_clear()
    try:
        h, w, t, upstream = inputs(6, 8, 30, seed=0)
        with pytest.warns(RuntimeWarning, match=r"^triton 3\.0\.0 is older than 3\.1.*PyTorch path$") as caught:
            got = value_and_grads(gathered_logprobs, h, w, t, 0.5, upstream)
            assert fused_logprobs.backend(torch.device("cpu")) == "torch"
        assert len(caught) == 1 and "\n" not in str(caught[0].message)
        check_fp32(got, h, w, t, 0.5, upstream, grad_w=True)
        with pytest.raises(InputError, match="use_triton=True, but the Triton kernels cannot run on cpu"):
            gathered_logprobs(h, w, t, use_triton=True)
    finally:
        fused_logprobs._triton_module.cache_clear()  # monkeypatch puts the real modules back afterwards


def test_pytorch_path_without_triton_installed():
    """In a fresh process where `import triton` fails, the PyTorch path runs, and is right, without a warning."""
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "warnings.simplefilter('error')\n"
        "import torch\n"
        "from minirl.kernels import fused_logprobs, gathered_logprobs\n"
        "h, w = torch.randn(6, 8, dtype=torch.float64).float(), torch.randn(30, 8)\n"
        "t = torch.randint(0, 30, (6,))\n"
        "ref = torch.log_softmax(h @ w.T / 0.5, -1).gather(1, t[:, None])[:, 0]\n"
        "err = float((gathered_logprobs(h, w, t, 0.5) - ref).abs().max())\n"
        "print(fused_logprobs.backend(torch.device('cpu')), 'minirl.kernels.triton_logprobs' in sys.modules, err)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    used, imported, err = out.split()
    assert used == "torch" and imported == "False" and float(err) < 1e-5


def load_gpu_check():
    """tools/gpu_check.py as a module (tools/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_checks_kernel_part_passes_these_kernels_and_fails_loudly_on_wrong_ones(monkeypatch):
    """tools/gpu_check.py's kernel part at a tiny shape under the interpreter: every case within tolerance;
    then with dh 1.5× too large, or not finite, the part raises rather than report the figures."""
    check = load_gpu_check()
    monkeypatch.setattr(check, "SMOKE_KERNELS", (16, 200, (8,)))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)  # it sets it
    out = check.part_kernels(smoke=True, device="cpu")
    assert len(out["cases"]) == 8 and all(c["ok"] for c in out["cases"])
    assert max(c["dh_rel_err"] for c in out["cases"]) < 1e-2
    backward = fused_logprobs.GatheredLogprobs.backward
    for damage, message in ((1.5, r"dh: max error .* past the tolerance"), (float("nan"), "dh: not finite")):
        def damaged(ctx, grad, damage=damage):
            dh, *rest = backward(ctx, grad)
            return (dh * damage, *rest)
        monkeypatch.setattr(fused_logprobs.GatheredLogprobs, "backward", staticmethod(damaged))
        with pytest.raises(check.CheckFailed, match=message):
            check.part_kernels(smoke=True, device="cpu")


def test_the_gpu_check_reads_bench_generate_or_fails_loudly():
    check = load_gpu_check()
    text = ("minirl.generate           123.4 tokens/s   first call 2.50 s (steady 1.00 s)\n"
            "transformers.generate      61.7 tokens/s   first call 1.20 s (steady 2.00 s)\n"
            "ratio minirl / transformers: 2.00x   (first calls included: 1.50x)\n")
    assert check.parse_generate(text) == {"minirl_tokens_per_s": 123.4, "minirl_first_call_s": 2.5,
                                          "transformers_tokens_per_s": 61.7, "ratio": 2.0}
    with pytest.raises(check.CheckFailed, match="printed no ratio"):
        check.parse_generate(text.replace("ratio minirl / transformers", "speed-up"))
    with pytest.raises(check.CheckFailed, match="expected a finite number > 0"):
        check.parse_generate(text.replace("123.4", "0.0"))
