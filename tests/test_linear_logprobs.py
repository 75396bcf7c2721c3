"""ctrlsafe.ops.linear_logprobs: the chunked CPU autograd Function against the reference."""
import importlib

import pytest
import torch

from ctrlsafe.ops import linear_logprobs

# the package re-exports the function under the module's name, so fetch the module explicitly
llp = importlib.import_module("ctrlsafe.ops.linear_logprobs")

SHAPES = [(1, 7, 1), (7, 33, 7), (33, 4097, 33), (70, 1000, 65)]  # (T, V, H)
TRANSFORMS = [(None, 1.0), (None, 0.7), (2.0, 1.3)]  # (softcap, temperature)


def make_case(T, V, H, dtype=torch.float32, ignore_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    target = torch.randint(0, V, (T,), generator=g)
    if ignore_every:
        target[::ignore_every] = -100
    return hidden.to(dtype), weight.to(dtype), target


def values_and_grads(backend, hidden, weight, target, seed=1, **kw):
    """(logp, lse, grad_hidden, grad_weight) for a random weighted sum of logp and lse."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, lse = linear_logprobs(h, w, target, return_lse=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(len(target), generator=g), torch.randn(len(target), generator=g)
    ((a * logp).sum() + (b * lse).sum()).backward()
    return logp, lse, h.grad, w.grad


@pytest.fixture(params=["default_blocks", "tiny_blocks"])
def blocks(request, monkeypatch):
    """Runs a test with the shipped tile sizes and with tiny ones (many partial tiles)."""
    if request.param == "tiny_blocks":
        monkeypatch.setattr(llp, "CPU_BLOCK_T", 16)
        monkeypatch.setattr(llp, "CPU_BLOCK_V", 128)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("softcap,temperature", TRANSFORMS)
def test_fp32_matches_reference(blocks, shape, softcap, temperature):
    """Values (logp, lse) and gradients of a random weighted sum agree with the reference in fp32
    (abs 1e-5 / rel 1e-4) on odd shapes with ignored positions, with soft-cap and temperature."""
    case = make_case(*shape)
    ours = values_and_grads("cpu", *case, softcap=softcap, temperature=temperature)
    ref = values_and_grads("reference", *case, softcap=softcap, temperature=temperature)
    for name, x, y in zip(("logp", "lse", "grad_hidden", "grad_weight"), ours, ref):
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_ignored_positions_are_zero_and_get_no_gradient(blocks):
    """Ignored rows give logp = lse = 0 and a zero gradient row, even with a large upstream grad."""
    hidden, weight, target = make_case(9, 50, 16, ignore_every=2)
    logp, lse, gh, _ = values_and_grads("cpu", hidden, weight, target)
    ignored = target == -100
    assert (logp[ignored] == 0).all() and (lse[ignored] == 0).all()
    assert (gh[ignored] == 0).all() and (gh[~ignored].abs().sum(1) > 0).all()
    assert (logp[~ignored] < 0).all()


def test_all_positions_ignored(blocks):
    """With every target ignored: zeros out, zero (not NaN) gradients, for cpu as for reference."""
    hidden, weight, _ = make_case(5, 40, 8)
    target = torch.full((5,), -7)
    for backend in ("cpu", "reference"):
        logp, lse, gh, gw = values_and_grads(backend, hidden, weight, target, ignore_index=-7)
        for t in (logp, lse, gh, gw):
            assert torch.equal(t, torch.zeros_like(t)), backend


def test_one_position_and_custom_ignore_index(blocks):
    """A single kept position among custom-ignored ones matches the reference."""
    hidden, weight, _ = make_case(6, 129, 17)
    target = torch.full((6,), 128)  # ignore_index is a real token id here
    target[4] = 3
    ours = values_and_grads("cpu", hidden, weight, target, ignore_index=128)
    ref = values_and_grads("reference", hidden, weight, target, ignore_index=128)
    assert ours[0].nonzero().flatten().tolist() == [4]
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_return_lse_off_gives_the_same_logp():
    """return_lse=False returns just the logp tensor, identical to the first of the pair."""
    hidden, weight, target = make_case(7, 33, 7)
    logp = linear_logprobs(hidden, weight, target, backend="cpu")
    pair = linear_logprobs(hidden, weight, target, backend="cpu", return_lse=True)
    assert isinstance(logp, torch.Tensor) and torch.equal(logp, pair[0])
    assert logp.dtype == torch.float32


def test_large_logits_stay_finite(blocks):
    """Logits of magnitude ~1e3 (no soft-cap) give finite values and grads matching an fp64 oracle."""
    hidden, weight, target = make_case(7, 300, 16)
    hidden = hidden * 300
    ours = values_and_grads("cpu", hidden, weight, target)
    truth = values_and_grads("reference", hidden.double(), weight.double(), target)
    for x, y in zip(ours, truth):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.double(), y, atol=2e-3, rtol=1e-4)


def test_gradient_of_one_input_only():
    """Frozen weight (or frozen hidden) gets no gradient; the other one still matches the reference."""
    hidden, weight, target = make_case(33, 200, 9)
    for frozen in ("weight", "hidden"):
        grads = []
        for backend in ("cpu", "reference"):
            h = hidden.clone().requires_grad_(frozen != "hidden")
            w = weight.clone().requires_grad_(frozen != "weight")
            linear_logprobs(h, w, target, backend=backend, softcap=4.0).sum().backward()
            assert (h.grad is None) == (frozen == "hidden") and (w.grad is None) == (frozen == "weight")
            grads.append(h.grad if frozen == "weight" else w.grad)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 0.8)])
def test_bf16_at_least_as_accurate_as_reference(blocks, softcap, temperature):
    """bf16 inputs: |ours - fp64 truth| <= |reference in bf16 - fp64 truth| + tol for values and
    grads (grads come back in bf16), the truth computed in fp64 from the same bf16 inputs."""
    hidden, weight, target = make_case(33, 1001, 40, dtype=torch.bfloat16)
    kw = dict(softcap=softcap, temperature=temperature)
    ours = values_and_grads("cpu", hidden, weight, target, **kw)
    ref = values_and_grads("reference", hidden, weight, target, **kw)
    truth = values_and_grads("reference", hidden.double(), weight.double(), target, **kw)
    for name, x, r, t in zip(("logp", "lse", "grad_hidden", "grad_weight"), ours, ref, truth):
        assert x.dtype == r.dtype, name
        tol = 1e-3 * t.abs().max().item() + 1e-6
        excess = (x.double() - t).abs() - (r.double() - t).abs()
        assert excess.max().item() <= tol, f"{name}: worse than the bf16 reference by {excess.max().item():.3g}"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_autocast_casts_like_a_matmul(backend, monkeypatch):
    """Under torch.autocast("cpu", bfloat16), fp32 hidden and weight reach the backend in bf16 (as
    F.linear's operands would); values equal the op on bf16 copies outside autocast, and the fp32
    leaves get fp32 gradients equal to those bf16 gradients upcast. float64 inputs are left alone."""
    seen = []
    impl = getattr(llp, backend)

    def spy(hidden, weight, *args, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return impl(hidden, weight, *args, **kw)

    monkeypatch.setattr(llp, backend, spy)
    hidden, weight, target = make_case(7, 33, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = values_and_grads(backend, hidden, weight, target, softcap=2.0)
    bf16 = values_and_grads(backend, hidden.bfloat16(), weight.bfloat16(), target, softcap=2.0)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    for name, x, y in zip(("logp", "lse", "grad_hidden", "grad_weight"), ours, bf16):
        assert x.dtype == torch.float32, name
        assert torch.equal(x, y.float()), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values_and_grads(backend, hidden.double(), weight.double(), target)
    assert seen[-1] == (torch.float64, torch.float64)


def test_gradcheck_float64():
    """The custom backward equals finite differences in float64 (soft-cap, temperature, ignored rows,
    gradient flowing through both logp and lse)."""
    hidden, weight, target = make_case(5, 11, 4, dtype=torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)

    def f(h, w):
        logp, lse = llp.cpu(h, w, target, -100, softcap=2.5, temperature=0.9)
        return (a * logp).sum() + (b * lse).sum()

    assert torch.autograd.gradcheck(f, (hidden, weight))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda h, w, t: (h, w, torch.tensor([0, 5, 40, 1])), r"target\[2\] = 40 is outside the vocabulary \[0, 40\)"),
        (lambda h, w, t: (h, w, torch.tensor([0, -1, 3, 1])), r"target\[1\] = -1"),
        (lambda h, w, t: (h[:, :3], w, t), "shape mismatch"),
        (lambda h, w, t: (h, w.bfloat16(), t), "both float32 or bfloat16"),
        (lambda h, w, t: (h, w, t.int()), "int64 targets"),
        (lambda h, w, t: (h[None], w, t), r"hidden \[T,H\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    """Out-of-vocabulary targets, shape and dtype mismatches raise ValueError naming the problem."""
    hidden, weight, target = make_case(4, 40, 8, ignore_every=0)
    with pytest.raises(ValueError, match=message):
        linear_logprobs(*change(hidden, weight, target), backend="cpu")


def test_bad_softcap_and_temperature():
    """Non-positive temperature or soft-cap raise ValueError."""
    hidden, weight, target = make_case(4, 40, 8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        linear_logprobs(hidden, weight, target, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        linear_logprobs(hidden, weight, target, softcap=-1.0)
