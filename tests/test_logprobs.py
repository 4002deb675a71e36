"""selected_logprobs against log_softmax of the model's full logits, one sequence at a time."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model
from minirl.errors import InputError
from minirl.logprobs import selected_logprobs
from minirl.lora import add_lora, disable_adapters, lora_parameters


def reference(model, sequences, picks, tau):
    """Each sequence alone, every logit, log-softmax at τ, then the picks."""
    out = []
    for i, t in picks:
        logits = model(torch.tensor([sequences[i]]))[0].float()  # (T_i, V)
        out.append(torch.log_softmax(logits / tau, dim=-1)[t - 1, sequences[i][t]])
    return torch.stack(out)


def grads(model, fn, weights, names):
    model.zero_grad(set_to_none=True)
    (fn() * weights).sum().backward()
    params = dict(model.named_parameters())
    return [params[n].grad.clone() for n in names]


CHECKED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
           "model.embed_tokens.weight", "model.norm.weight"]


@settings(max_examples=10, deadline=None)
@given(data=st.data(), tau=st.floats(0.3, 2.0), tied=st.booleans())
def test_values_and_gradients_match_the_full_logits(data, tau, tied):
    model = random_model(0, tie_word_embeddings=tied)
    lengths = data.draw(st.lists(st.integers(2, 12), min_size=1, max_size=4))
    sequences = [data.draw(st.lists(st.integers(0, 95), min_size=n, max_size=n)) for n in lengths]
    every = [(i, t) for i, s in enumerate(sequences) for t in range(1, len(s))]
    picks = data.draw(st.lists(st.sampled_from(every), min_size=1, max_size=20))  # repeats allowed
    weights = torch.randn(len(picks), generator=torch.Generator().manual_seed(len(picks)))
    names = CHECKED + ([] if tied else ["lm_head.weight"])

    ours = selected_logprobs(model, sequences, picks, tau)
    torch.testing.assert_close(ours, reference(model, sequences, picks, tau), atol=1e-5, rtol=1e-5)
    got = grads(model, lambda: selected_logprobs(model, sequences, picks, tau), weights, names)
    expected = grads(model, lambda: reference(model, sequences, picks, tau), weights, names)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_frozen_lm_head_gradients_match_the_materialised_logits(dtype, tied):
    """The LoRA case: lm_head frozen (tied: the embedding with it), so the kernel accumulates dh in its forward.
    Reference: the same hidden states, every logit in fp32, log_softmax, gather, autograd through the body.
    bf16: the body runs in bf16 on both sides; only dh differs, by its rounding (a few bf16 eps)."""
    model = random_model(3, tie_word_embeddings=tied).to(dtype)
    model.lm_head.weight.requires_grad_(False)
    sequences = [[3, 14, 15, 92, 65, 35, 89], [79, 32, 38], [46, 26, 43, 38, 32, 79, 50, 28]]
    picks = [(0, 1), (0, 6), (1, 2), (2, 3), (2, 7), (0, 6)]
    weights = torch.randn(len(picks), generator=torch.Generator().manual_seed(1))
    names = [n for n in CHECKED if n != "model.embed_tokens.weight" or not tied]

    def materialised():
        out = []
        for i, t in picks:
            hidden = model.hidden_states(torch.tensor([sequences[i][:t]]))[0, -1].float()  # (D,)
            logp = torch.log_softmax(hidden @ model.lm_head.weight.float().T / 0.7, dim=-1)  # (V,)
            out.append(logp[sequences[i][t]])
        return torch.stack(out)

    torch.testing.assert_close(selected_logprobs(model, sequences, picks, 0.7), materialised(), atol=1e-4, rtol=1e-4)
    got = grads(model, lambda: selected_logprobs(model, sequences, picks, 0.7), weights, names)
    expected = grads(model, materialised, weights, names)
    assert model.lm_head.weight.grad is None
    tol = 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * float(b.float().abs().max()))


def test_one_forward_cut_after_the_last_pick_and_no_full_logits():
    model = random_model(1)
    sequences = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [5, 5, 5, 5, 5, 5, 5, 5, 5]]
    picks = [(0, 3), (2, 5), (0, 1), (1, 2)]  # sequence 3 has no pick
    shapes = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape))),
             model.lm_head.register_forward_hook(lambda *_: pytest.fail("lm_head ran: full logits were computed"))]
    logp = selected_logprobs(model, sequences, picks, 0.7)
    assert shapes == [(3, 5)]  # rows 0, 1, 2; longest need: t = 5 of sequence 2
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(logp, reference(model, sequences, picks, 0.7), atol=1e-5, rtol=1e-5)


def test_no_picks_give_an_empty_tensor():
    assert selected_logprobs(random_model(0), [[1, 2, 3]], []).shape == (0,)
    assert [x.shape for x in selected_logprobs(random_model(0), [[1, 2, 3]], [], reference=True)] == [(0,), (0,)]


@pytest.mark.parametrize("layers, runs", [([2, 3], [1, 1, 2, 2]), ([0, 3], [2, 2, 2, 2])])
def test_the_reference_shares_the_layers_below_the_first_adapter(layers, runs):
    model = random_model(2, num_hidden_layers=4)
    add_lora(model, targets=("q_proj", "v_proj"), layers=layers, rank=4, alpha=8,
             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0 would make π_θ and π_ref equal
        for p in lora_parameters(model):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    sequences, picks = [[1, 2, 3, 4, 5], [6, 7, 8]], [(0, 4), (1, 1), (0, 2), (1, 2)]
    counts = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    logp, ref = selected_logprobs(model, sequences, picks, 0.7, reference=True)
    assert counts == runs  # layers below the first adapter once, the others once for each policy
    with torch.no_grad(), disable_adapters(model):
        expected_ref = reference(model, sequences, picks, 0.7)
    torch.testing.assert_close(logp, reference(model, sequences, picks, 0.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, expected_ref, atol=1e-5, rtol=1e-5)
    assert (logp - ref).abs().max() > 1e-3 and logp.requires_grad and not ref.requires_grad


@pytest.mark.parametrize("picks, message", [
    ([(0, 0)], r"picks\[0\] = \(0, 0\): position t must be in \[1, 3\)"),
    ([(0, 1), (0, 3)], r"picks\[1\] = \(0, 3\): position t must be in \[1, 3\)"),
    ([(2, 1)], r"picks\[0\] = \(2, 1\): sequence index i must be in \[0, 2\)"),
    ([(0, 1.0)], r"picks\[0\]: expected a pair of ints"),
    ([(1, 1)], r"sequences\[1\]\[1\] = 200: expected a token id in \[0, 96\)"),
])
def test_bad_picks_are_clear_errors(picks, message):
    with pytest.raises(InputError, match=message):
        selected_logprobs(random_model(0), [[1, 2, 3], [4, 200]], picks)
