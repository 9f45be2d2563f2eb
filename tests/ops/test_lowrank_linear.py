"""lowrank_linear (the fused low-rank op) against its fp64 specification, on every backend here.

Every output and gradient is compared with autograd through the reference spec in fp64, replaying
the dropout mask the op drew. Tolerance: fp32 results must agree normwise to ``FP32_RTOL``
(``max|err| <= rtol * max|expected|``); 16-bit results follow the flash-attention rule: at most
twice the error of the plain same-dtype torch composition.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from corda_kernels.kernels.reference import lowrank_linear as reference
from corda_kernels.ops import lowrank_linear as lr_ops
from corda_kernels.ops.lowrank_linear import check_factors, delta_weight, dropout_mask, lowrank_linear

BACKENDS = ["reference", "torch", "triton"]
NAMES = ("x", "weight", "A", "B", "diag", "bias")
FP32_RTOL = 2e-5
SEED = 1234

# (rows selected, cols selected) out of (d_out=29, d_in=37); None = all, 0 = empty set.
MASKS = {
    "dense": (None, None),
    "rows": (13, None),
    "cols": (None, 19),
    "rows+cols": (13, 19),
    "no-rows": (0, 19),
    "no-cols": (13, 0),
}
# (diag, bias, dropout)
FEATURES = {
    "plain": (False, False, 0.0),
    "diag+bias": (True, True, 0.0),
    "diag+dropout": (True, False, 0.3),
    "bias+dropout": (False, True, 0.3),
}
# which tensors require grad
GRADS = {
    "all": set(NAMES),
    "asymmetric (A, W frozen)": {"x", "B", "diag", "bias"},
    "B frozen": {"x", "A", "diag"},
    "diag only": {"diag"},
    "A only": {"A"},
}


def make_inputs(*, shape=(23,), d_in=37, d_out=29, r=5, rows=None, cols=None, diag=False, bias=False, seed=0):
    """fp64 tensors (dict by NAMES, None where absent) and the index sets."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    n_rows = d_out if rows is None else rows
    n_cols = d_in if cols is None else cols
    tensors = dict(
        x=randn(*shape, d_in),
        weight=randn(d_out, d_in) / math.sqrt(d_in),
        A=randn(r, n_cols) / math.sqrt(max(n_cols, 1)),
        B=randn(n_rows, r),
        diag=randn(r) if diag else None,
        bias=randn(d_out) if bias else None,
    )
    index = dict(
        row_index=None if rows is None else torch.randperm(d_out, generator=g)[:rows],
        col_index=None if cols is None else torch.randperm(d_in, generator=g)[:cols],
    )
    return tensors, index


def run(tensors, index, grads, *, dtype, impl="op", scale=0.7, dropout=0.0, seed=SEED, device="cpu"):
    """Forward + backward of ``impl`` ("op", "spec": fp64 reference spec, "plain": same-dtype torch).

    Returns ``{"y": y, name: grad, ...}`` for the tensors in ``grads``.
    """
    leaves = {
        k: v.detach().to(device=device, dtype=dtype).requires_grad_(k in grads)
        for k, v in tensors.items()
        if v is not None
    }
    idx = {k: None if v is None else v.to(device) for k, v in index.items()}
    kw = dict(scale=scale, bias=leaves.get("bias"), diag=leaves.get("diag"), **idx)
    x = leaves["x"]
    n_cols = leaves["A"].shape[1]
    keep = dropout_mask(seed, x.numel() // x.shape[-1], n_cols, dropout, device) if dropout else None
    if impl == "op":
        y = lowrank_linear(x, leaves["weight"], leaves["A"], leaves["B"], dropout=dropout, seed=seed, **kw)
    elif impl == "spec":
        y = reference.lowrank_linear(x, leaves["weight"], leaves["A"], leaves["B"], keep=keep, dropout=dropout, **kw)
    else:
        y = plain_lowrank(x, leaves["weight"], leaves["A"], leaves["B"], keep=keep, dropout=dropout, **kw)
    g = torch.Generator().manual_seed(99)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=device, dtype=y.dtype)
    wrt = [k for k in NAMES if k in leaves and k in grads]
    out = {"y": y.detach()}
    if wrt:
        out.update(zip(wrt, torch.autograd.grad(y, [leaves[k] for k in wrt], dy)))
    return out


def plain_lowrank(x, weight, A, B, *, scale, bias, diag, row_index, col_index, keep, dropout):
    """The straightforward same-dtype torch composition (the accuracy yardstick for 16-bit)."""
    xc = x if col_index is None else x[..., col_index]
    if keep is not None:
        xc = xc * keep.reshape(xc.shape).to(xc.dtype) / (1 - dropout)
    t = xc @ A.T
    if diag is not None:
        t = t * diag
    low = (t * scale) @ B.T
    y = F.linear(x, weight, bias)
    return y + low if row_index is None else y.index_add(-1, row_index, low)


def max_rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def assert_matches(got, expected, rtol):
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].shape == expected[k].shape, k
        assert got[k].dtype == got["y"].dtype, k
        err = max_rel_err(got[k], expected[k])
        assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("mask", list(MASKS))
def test_matches_spec_fp32(backend, features, mask, force_backend):
    force_backend(backend)
    rows, cols = MASKS[mask]
    diag, bias, dropout = FEATURES[features]
    tensors, index = make_inputs(rows=rows, cols=cols, diag=diag, bias=bias, shape=(3, 8) if diag else (23,))
    grads = set(NAMES)
    got = run(tensors, index, grads, dtype=torch.float32, dropout=dropout)
    expected = run(tensors, index, grads, dtype=torch.float64, impl="spec", dropout=dropout)
    assert_matches(got, expected, FP32_RTOL)
    if rows == 0 or cols == 0:  # an empty index set: no low-rank term at all
        base = F.linear(tensors["x"], tensors["weight"], tensors["bias"])
        assert max_rel_err(got["y"], base) <= FP32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", list(GRADS))
@pytest.mark.parametrize("mask", ["dense", "rows+cols"])
def test_frozen_patterns(backend, pattern, mask, force_backend):
    force_backend(backend)
    rows, cols = MASKS[mask]
    tensors, index = make_inputs(rows=rows, cols=cols, diag=True, bias=True, shape=(2, 9))
    grads = GRADS[pattern]
    got = run(tensors, index, grads, dtype=torch.float32, dropout=0.2)
    expected = run(tensors, index, grads, dtype=torch.float64, impl="spec", dropout=0.2)
    assert_matches(got, expected, FP32_RTOL)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp16_within_twice_plain_error(backend, force_backend):
    force_backend(backend)
    tensors, index = make_inputs(rows=13, cols=19, diag=True, bias=True, shape=(31,), r=8)
    grads = set(NAMES)
    got = run(tensors, index, grads, dtype=torch.float16, dropout=0.25)
    plain = run(tensors, index, grads, dtype=torch.float16, impl="plain", dropout=0.25)
    expected = run(tensors, index, grads, dtype=torch.float64, impl="spec", dropout=0.25)
    for k in expected:
        assert got[k].dtype == torch.float16 and got[k].shape == expected[k].shape
        ours, yardstick = max_rel_err(got[k], expected[k]), max_rel_err(plain[k], expected[k])
        assert ours <= 2 * yardstick + 1e-5, f"{k}: {ours:.2e} vs plain fp16 {yardstick:.2e}"


def run_mixed(tensors, index, *, dtype, factor_dtype, dropout=0.0, scale=0.7):
    """Forward + backward of the op with x/weight/bias in ``dtype`` and A/B/diag in ``factor_dtype``."""
    leaves = {
        k: v.detach().to(factor_dtype if k in ("A", "B", "diag") else dtype).requires_grad_()
        for k, v in tensors.items()
        if v is not None
    }
    y = lowrank_linear(
        leaves["x"],
        leaves["weight"],
        leaves["A"],
        leaves["B"],
        scale=scale,
        bias=leaves.get("bias"),
        diag=leaves.get("diag"),
        dropout=dropout,
        seed=SEED,
        **index,
    )
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(y.dtype)
    wrt = [k for k in NAMES if k in leaves]
    return {"y": y.detach(), **dict(zip(wrt, torch.autograd.grad(y, [leaves[k] for k in wrt], dy)))}


@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("reference", torch.float16),
        ("reference", torch.bfloat16),
        ("torch", torch.float16),
        ("torch", torch.bfloat16),
        ("triton", torch.float16),  # the interpreter has no bf16
    ],
)
@pytest.mark.parametrize("mask,dropout", [("dense", 0.0), ("rows+cols", 0.3)])
def test_fp32_factors_on_16bit_follow_the_rounding_rule(backend, dtype, mask, dropout, force_backend):
    """fp32 A/B/diag on a 16-bit x/weight: the forward equals, bit for bit, the same-dtype op given the
    factors rounded to the compute dtype (A, B rounded where they enter a product, diag not: its
    values here are exact in ``dtype``); factor gradients come back fp32, at least as accurate."""
    force_backend(backend)
    rows, cols = MASKS[mask]
    tensors, index = make_inputs(rows=rows, cols=cols, diag=True, bias=True, shape=(3, 11), r=6)
    tensors["diag"] = tensors["diag"].to(dtype).double()
    mixed = run_mixed(tensors, index, dtype=dtype, factor_dtype=torch.float32, dropout=dropout)
    rounded = {k: (v.to(dtype).double() if v is not None else None) for k, v in tensors.items()}
    same = run_mixed(rounded, index, dtype=dtype, factor_dtype=dtype, dropout=dropout)
    expected = run(rounded, index, set(NAMES), dtype=torch.float64, impl="spec", dropout=dropout)
    assert mixed["y"].dtype == dtype and torch.equal(mixed["y"], same["y"])
    for k in ("x", "weight", "bias"):
        assert mixed[k].dtype == dtype and torch.equal(mixed[k], same[k]), k
    for k in ("A", "B", "diag"):
        assert mixed[k].dtype == torch.float32, k
        ours, yardstick = max_rel_err(mixed[k], expected[k]), max_rel_err(same[k], expected[k])
        assert ours <= 2 * yardstick + 1e-5, f"{k}: {ours:.2e} vs same-dtype {yardstick:.2e}"


def test_factor_dtypes_other_than_fp32_or_the_weights_are_refused():
    w = torch.randn(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"A is torch.float16 but weight is torch.bfloat16 \(A must be fp32 or"):
        lowrank_linear(w.new_ones(2, 3), w, torch.randn(2, 3).half(), torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"bias is torch.float32 but weight is torch.bfloat16"):
        lowrank_linear(w.new_ones(2, 3), w, torch.randn(2, 3), torch.randn(4, 2), bias=torch.randn(4))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_autocast_runs_the_op_in_bf16(backend, force_backend):
    """Under CPU bf16 autocast, fp32 x/weight/bias are cast to bf16 (as nn.Linear), the factors are
    left fp32 (rounded inside) and their gradients come back fp32: the result is exactly the op on
    bf16-cast inputs."""
    force_backend(backend)
    tensors, index = make_inputs(rows=13, cols=19, diag=True, bias=True, shape=(3, 7))
    leaves = {k: v.float().requires_grad_() for k, v in tensors.items()}
    kw = dict(scale=0.5, **index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear(
            *(leaves[k] for k in ("x", "weight", "A", "B")), bias=leaves["bias"], diag=leaves["diag"], **kw
        )
    assert y.dtype == torch.bfloat16
    cast = {k: v.detach().to(torch.bfloat16 if k in ("x", "weight", "bias") else v.dtype) for k, v in leaves.items()}
    cast = {k: v.requires_grad_() for k, v in cast.items()}
    y_cast = lowrank_linear(*(cast[k] for k in ("x", "weight", "A", "B")), **_extras(cast), **kw)
    assert torch.equal(y, y_cast)
    dy = torch.randn(y.shape, dtype=torch.bfloat16)
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    want = torch.autograd.grad(y_cast, list(cast.values()), dy)
    for k, g, w in zip(leaves, got, want):
        assert g.dtype == leaves[k].dtype, k
        assert torch.equal(g, w.to(g.dtype)), k


def _extras(leaves):
    return dict(bias=leaves["bias"], diag=leaves["diag"])


def test_autocast_leaves_fp64_alone():
    tensors, index = make_inputs(rows=13, cols=19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear(tensors["x"], tensors["weight"], tensors["A"], tensors["B"], **index)
    assert y.dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gradcheck_fp64(backend, dropout, force_backend):
    """The hand-written backward formulas against finite differences (mask fixed by the seed)."""
    force_backend(backend)
    tensors, index = make_inputs(shape=(2, 3), d_in=6, d_out=5, r=2, rows=3, cols=4, diag=True, bias=True)
    leaves = [tensors[k].clone().requires_grad_() for k in NAMES]

    def fn(x, weight, A, B, diag, bias):
        return lowrank_linear(x, weight, A, B, scale=0.6, bias=bias, diag=diag, dropout=dropout, seed=5, **index)

    assert torch.autograd.gradcheck(fn, leaves)


def test_dropout_mask_statistics_and_replay():
    keep = dropout_mask(7, 300, 200, 0.3)
    assert keep.shape == (300, 200) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert torch.equal(keep, dropout_mask(7, 300, 200, 0.3))
    assert not torch.equal(keep, dropout_mask(8, 300, 200, 0.3))
    # Rows and columns are not shifted copies of each other.
    assert (keep[1:] != keep[:-1]).float().mean() > 0.3 and (keep[:, 1:] != keep[:, :-1]).float().mean() > 0.3


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_reproducible_from_seed_and_generator(backend, force_backend):
    force_backend(backend)
    tensors, index = make_inputs(rows=13, cols=19)
    args = [tensors[k].float() for k in ("x", "weight", "A", "B")]
    kw = dict(dropout=0.5, **index)
    ys = [lowrank_linear(*args, generator=torch.Generator().manual_seed(s), **kw) for s in (3, 3, 4)]
    assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], ys[2])
    torch.manual_seed(0)
    y_default = lowrank_linear(*args, **kw)
    torch.manual_seed(0)
    assert torch.equal(y_default, lowrank_linear(*args, **kw))
    no_drop = lowrank_linear(*args, **index)
    assert not torch.equal(y_default, no_drop)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_asymmetric_saves_only_n_by_r(backend, force_backend):
    """A frozen: x is not saved for backward, only u = drop(x_c)·Aᵀ (N×r) plus the seed."""
    force_backend(backend)
    tensors, index = make_inputs(shape=(4, 6), rows=13, cols=19, diag=True, bias=True)
    t = {k: v.float() for k, v in tensors.items()}
    x = t["x"].requires_grad_()
    params = [t["weight"], t["A"], t["B"].requires_grad_(), t["diag"].requires_grad_(), t["bias"], *index.values()]
    n_tokens, r = 24, t["A"].shape[0]

    def saved_by(trainable_A):
        t["A"].requires_grad_(trainable_A)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            y = lowrank_linear(x, t["weight"], t["A"], t["B"], bias=t["bias"], diag=t["diag"], dropout=0.1, **index)
        y.sum().backward()
        activations = [s for s in saved if all(s.data_ptr() != p.data_ptr() for p in params)]
        return activations

    frozen = saved_by(False)
    assert all(s.data_ptr() != x.data_ptr() for s in frozen)
    assert sorted(s.numel() for s in frozen) == [1, n_tokens * r]  # the seed and u
    assert any(tuple(s.shape) == (n_tokens, r) for s in frozen)
    trainable = saved_by(True)  # dA needs x
    assert any(s.data_ptr() == x.data_ptr() for s in trainable)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_training_runs_native_autograd(dtype, force_backend):
    """Torch backend, one fp32/fp64 dtype, no index sets or dropout: the graph holds only torch's
    own backward nodes (no Python Function per layer), still saves no ``x`` when A and W are frozen,
    and matches the fp64 spec (the spec comparisons above cover every feature of this path too)."""
    force_backend("torch")
    tensors, _ = make_inputs(shape=(4, 6), diag=True, bias=True)
    t = {k: v.to(dtype) for k, v in tensors.items()}
    x = t["x"].requires_grad_()
    for k in ("B", "diag"):
        t[k].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        y = lowrank_linear(x, t["weight"], t["A"], t["B"], bias=t["bias"], diag=t["diag"], scale=0.7)
    nodes, stack = [], [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            nodes.append(node)
            stack += [n for n, _ in node.next_functions]
    assert not any(isinstance(n, torch.autograd.function.BackwardCFunction) for n in nodes), nodes
    assert all(s.data_ptr() != x.data_ptr() for s in saved)
    index = {"row_index": None, "col_index": None}
    got = run(tensors, index, {"x", "B", "diag", "bias"}, dtype=dtype)
    expected = run(tensors, index, {"x", "B", "diag", "bias"}, dtype=torch.float64, impl="spec")
    assert_matches(got, expected, FP32_RTOL if dtype == torch.float32 else 1e-12)
    big = torch.zeros(lr_ops._NATIVE_MAX_ELEMENTS // 37 + 1, 37, dtype=dtype, requires_grad=True)
    y = lowrank_linear(big, t["weight"], t["A"], t["B"], diag=t["diag"])  # large: the Function's in-place dx
    assert isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_zero_tokens(backend, force_backend):
    force_backend(backend)
    tensors, index = make_inputs(shape=(0,), rows=13, cols=19, diag=True, bias=True)
    got = run(tensors, index, set(NAMES), dtype=torch.float32)
    assert got["y"].shape == (0, 29) and got["x"].shape == (0, 37)
    for k in ("weight", "A", "B", "diag", "bias"):
        assert got[k].abs().max().item() == 0.0


def test_triton_token_split_with_atomics(force_backend):
    """Enough tokens that the dA/dB reductions split over a third grid axis (fp32 atomics)."""
    force_backend("triton")
    tensors, index = make_inputs(shape=(260,), d_in=20, d_out=18, r=3, rows=11, cols=13, diag=True)
    grads = {"A", "B", "diag"}
    got = run(tensors, index, grads, dtype=torch.float32, dropout=0.3)
    expected = run(tensors, index, grads, dtype=torch.float64, impl="spec", dropout=0.3)
    assert_matches(got, expected, FP32_RTOL)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_inputs(backend, force_backend):
    force_backend(backend)
    tensors, index = make_inputs(rows=13, cols=19, diag=True, bias=True, shape=(17,))
    expected = run(tensors, index, set(NAMES), dtype=torch.float64, impl="spec")
    strided = dict(tensors)
    strided["x"] = tensors["x"].T.contiguous().T  # column-major
    strided["weight"] = tensors["weight"].T.contiguous().T
    strided["A"] = torch.stack([tensors["A"], tensors["A"]], -1)[..., 0]  # column stride 2
    got = run(strided, index, set(NAMES), dtype=torch.float32)
    assert_matches(got, expected, FP32_RTOL)


def test_delta_weight_is_the_dense_update():
    tensors, index = make_inputs(rows=13, cols=19, diag=True, shape=(11,))
    dw = delta_weight(tensors["A"], tensors["B"], 29, 37, scale=0.7, diag=tensors["diag"], **index)
    assert dw.dtype == torch.float32 and dw.shape == (29, 37)
    y = run(tensors, index, set(), dtype=torch.float64, impl="spec")["y"]
    dense = tensors["x"] @ (tensors["weight"] + dw.double()).T
    assert max_rel_err(dense, y) < 1e-6


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend, force_backend):
    """The one registered op (dense base here; tests/ops/test_quantized.py checks quantized bases) with
    every optional part, and with none: schema, fake kernel, autograd registration."""
    force_backend(backend)
    tensors, index = make_inputs(shape=(2, 5), d_in=12, d_out=10, r=3, rows=6, cols=7, diag=True, bias=True)
    t = {k: v.float().requires_grad_(k in ("x", "A", "B", "diag")) for k, v in tensors.items()}
    opts = lr_ops.Options(0.5, t["bias"], index["row_index"], index["col_index"], t["diag"], 0.25, torch.tensor(11))
    args = (t["x"], [t["weight"]], 0, [10, 12], t["A"], t["B"], *opts)
    torch.library.opcheck(lr_ops._lowrank_linear_op, args)
    dense, _ = make_inputs(shape=(4,), d_in=12, d_out=10, r=3)
    d = {k: v.float() for k, v in dense.items() if v is not None}
    args = (d["x"].requires_grad_(), [d["weight"]], 0, [10, 12], d["A"], d["B"].requires_grad_(), *lr_ops.Options())
    torch.library.opcheck(lr_ops._lowrank_linear_op, args)


def test_compile_fullgraph_aot_eager(force_backend):
    force_backend("torch")
    tensors, index = make_inputs(shape=(2, 5), rows=13, cols=19, diag=True, bias=True)
    t = {k: v.float() for k, v in tensors.items()}

    def step(x, A, B, diag):
        y = lowrank_linear(x, t["weight"], A, B, scale=0.5, bias=t["bias"], diag=diag, dropout=0.2, seed=3, **index)
        return torch.tanh(y).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t[k].clone().requires_grad_() for k in ("x", "A", "B", "diag")]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def _bad_inputs():
    t, index = make_inputs(rows=3, cols=4, shape=(6,), d_in=8, d_out=7, r=2, diag=True, bias=True)
    base = dict(
        x=t["x"].float(),
        weight=t["weight"].float(),
        A=t["A"].float(),
        B=t["B"].float(),
        diag=t["diag"].float(),
        bias=t["bias"].float(),
        **index,
    )

    def case(exc, match, **changes):
        kw = dict(base)
        kw.update(changes)
        return pytest.param(kw, exc, match, id=match[:40])

    ri, ci = index["row_index"], index["col_index"]
    return [
        case(ValueError, r"row_index holds 7, out of range for out_features=7", row_index=torch.tensor([0, 7, 1])),
        case(ValueError, r"col_index holds -1, out of range", col_index=torch.tensor([0, -1, 2, 3])),
        case(ValueError, r"row_index holds duplicated entries", row_index=torch.tensor([2, 2, 1])),
        case(TypeError, r"col_index must be an int64 tensor, got torch.int32", col_index=ci.int()),
        case(ValueError, r"row_index must be 1-D", row_index=ri[None]),
        case(ValueError, r"row_index has 3 entries but B \(2, 2\) has 2 rows", B=base["B"][:2]),
        case(ValueError, r"col_index has 4 entries but A \(2, 5\) has 5 columns", A=torch.randn(2, 5)),
        case(ValueError, r"A \(2, 4\) has 4 columns but in_features is 8; pass col_index", col_index=None),
        case(ValueError, r"B \(3, 2\) has 3 rows but out_features is 7; pass row_index", row_index=None),
        case(ValueError, r"disagree on the rank", B=torch.randn(3, 3)),
        case(ValueError, r"rank r = A.shape\[0\] is 0", A=torch.randn(0, 4), B=torch.randn(3, 0), diag=None),
        case(ValueError, r"diag must have shape \(2,\)", diag=torch.randn(3)),
        case(ValueError, r"bias must have shape \(7,\)", bias=torch.randn(8)),
        case(ValueError, r"weight must be 2-D", weight=torch.randn(7, 8, 1)),
        case(TypeError, r"x must be a float tensor", x=torch.ones(6, 8, dtype=torch.int64)),
        case(TypeError, r"A must be a float tensor", A=torch.ones(2, 4, dtype=torch.int32)),
        case(
            TypeError,
            r"dtype mismatch: x is torch.float64 but weight is torch.float32",
            x=torch.randn(6, 8, dtype=torch.float64),
        ),
        case(TypeError, r"dtype mismatch: B is torch.float16 but weight is torch.float32", B=base["B"].half()),
        case(ValueError, r"device mismatch: x is on meta but weight is on cpu", x=torch.randn(6, 8, device="meta")),
        case(ValueError, r"device mismatch: diag is on meta", diag=torch.randn(2, device="meta")),
        case(ValueError, r"x \(6, 9\) must end in in_features=8", x=torch.randn(6, 9)),
        case(ValueError, r"dropout must be in \[0, 1\), got 1.0", dropout=1.0),
        case(TypeError, r"seed must be an int or a one-element integer tensor", dropout=0.1, seed=1.5),
    ]


@pytest.mark.parametrize("kw,exc,match", _bad_inputs())
def test_bad_input(kw, exc, match):
    kw = dict(kw)
    x, weight, A, B = (kw.pop(k) for k in ("x", "weight", "A", "B"))
    with pytest.raises(exc, match=match):
        lowrank_linear(x, weight, A, B, **kw)


def test_check_factors_can_skip_index_values():
    t, _ = make_inputs(rows=3, d_out=7, d_in=8, r=2)
    check_factors(t["weight"], t["A"], t["B"], row_index=torch.tensor([5, 5, 9]), validate_indices=False)


def test_forced_triton_cannot_run_bf16_interpreted(force_backend):
    force_backend("triton")
    t, _ = make_inputs(d_in=8, d_out=7, r=2)
    args = [t[k].bfloat16() for k in ("x", "weight", "A", "B")]
    with pytest.raises(RuntimeError, match="triton backend of lowrank_linear cannot run on cpu"):
        lowrank_linear(*args)


# ----------------------------------------------------------------------------------------------
# GPU (real Triton, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r,rows,cols,dropout", [(16, None, None, 0.0), (64, 100, 160, 0.1), (128, 150, None, 0.0)])
def test_gpu_matches_spec(dtype, r, rows, cols, dropout, force_backend, cuda_device):
    force_backend("triton")
    tensors, index = make_inputs(shape=(3, 700), d_in=320, d_out=200, r=r, rows=rows, cols=cols, diag=True, bias=True)
    grads = set(NAMES)
    kw = dict(dropout=dropout, device=cuda_device)
    got = run(tensors, index, grads, dtype=dtype, **kw)
    expected = run(tensors, index, grads, dtype=torch.float64, impl="spec", **kw)
    if dtype == torch.float32:
        assert_matches(got, expected, FP32_RTOL)
        return
    plain = run(tensors, index, grads, dtype=dtype, impl="plain", **kw)
    for k in expected:
        ours, yardstick = max_rel_err(got[k], expected[k]), max_rel_err(plain[k], expected[k])
        assert ours <= 2 * yardstick + 1e-5, f"{k}: {ours:.2e} vs plain {dtype} {yardstick:.2e}"


@pytest.mark.gpu
def test_gpu_asymmetric_saves_only_n_by_r(force_backend, cuda_device):
    force_backend("triton")
    tensors, index = make_inputs(shape=(512,), d_in=256, d_out=256, r=16, rows=128, cols=128)
    t = {k: v.to(cuda_device, torch.bfloat16) for k, v in tensors.items() if v is not None}
    index = {k: v.to(cuda_device) for k, v in index.items()}
    x, B = t["x"].requires_grad_(), t["B"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        y = lowrank_linear(x, t["weight"], t["A"], B, **index)
    y.float().sum().backward()
    params = [t["weight"], t["A"], B, *index.values()]
    activations = [s for s in saved if all(s.data_ptr() != p.data_ptr() for p in params)]
    assert [tuple(s.shape) for s in activations] == [(512, 16)]
