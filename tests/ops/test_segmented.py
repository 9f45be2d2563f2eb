"""lowrank_linear_segmented (many adapters, one per row) against its fp64 specification, the
single-adapter op and PEFT's mixed-batch forward, on every backend here.

Outputs and gradients are compared with autograd through the reference spec in fp64. Tolerances as
in tests/ops/test_lowrank_linear.py: fp32 results agree normwise to ``FP32_RTOL`` (``max|err| <= rtol *
max|expected|``: a row given the wrong adapter is off by O(1) there); 16-bit results are at most
twice the error of the plain same-dtype torch composition (the flash-attention rule).
"""

import math
import re
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import corda_kernels as ck
from corda_kernels.kernels.reference import lowrank_linear as single_reference
from corda_kernels.kernels.reference import segmented as reference
from corda_kernels.ops import segmented as seg_ops

BACKENDS = ["reference", "torch", "triton"]
NAMES = ("x", "weight", "A", "B", "bias")
FP32_RTOL = 2e-5
RANKS = (5, 3, 8, 1)  # r_max 8: adapters 0, 1 and 3 are padded
SCALES = (0.5, 1.25, 2.0, -0.75)


def _index(pattern: str, n_rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Row indices: ``shuffled`` (every adapter and -1, repeated, in random order), ``sorted`` (the
    same, ascending), ``one`` (every row adapter 2), ``none`` (every row -1), ``some`` (adapters 1
    and 3 and -1 only: the others get no rows)."""
    if pattern == "one":
        return torch.full((n_rows,), 2)
    if pattern == "none":
        return torch.full((n_rows,), -1)
    values = torch.tensor([1, 3, -1]) if pattern == "some" else torch.arange(-1, n)
    index = values.repeat(n_rows // values.numel() + 1)[:n_rows][torch.randperm(n_rows, generator=g)]
    return index.sort().values if pattern == "sorted" else index


def make_inputs(*, shape=(23,), d_in=37, d_out=29, ranks=RANKS, pattern="shuffled", per_sequence=False, seed=0):
    """fp64 tensors (dict by NAMES; A/B stacked, their padding filled with garbage that must never
    count), the index (of ``shape``, or ``shape[:1]`` when ``per_sequence``) and ranks."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    n, r_max = len(ranks), max(ranks)
    tensors = dict(
        x=randn(*shape, d_in),
        weight=randn(d_out, d_in) / math.sqrt(d_in),
        A=randn(n, r_max, d_in) / math.sqrt(d_in),
        B=randn(n, d_out, r_max),
        bias=randn(d_out),
    )
    rows = shape[:1] if per_sequence else shape
    index = _index(pattern, math.prod(rows), n, g).reshape(rows)
    return tensors, index, torch.tensor(ranks)


def plain_segmented(x, weight, A, B, index, scales, ranks, bias):
    """The straightforward same-dtype torch composition (the accuracy yardstick for 16-bit): each
    adapter's LoRA term on its rows (PEFT's mixed-batch forward, per token)."""
    y = F.linear(x, weight, bias)
    idx = index.reshape(index.shape + (1,) * (x.dim() - 1 - index.dim())).expand(x.shape[:-1])
    for a, r in enumerate(ranks.tolist()):
        rows = idx == a
        low = ((x[rows] @ A[a, :r].to(x.dtype).T) * scales[a]) @ B[a, :, :r].to(x.dtype).T
        y = y.index_put((rows,), y[rows] + low)
    return y


def run(tensors, index, ranks, grads, *, dtype, impl="op", device="cpu", factor_dtype=None, scales=SCALES):
    """Forward + backward of ``impl`` ("op", "spec": the fp64 reference, "plain": same-dtype torch);
    ``{"y": y, name: grad, ...}`` for the tensors in ``grads``."""
    factor_dtype = factor_dtype or dtype
    leaves = {
        k: v.detach().to(device=device, dtype=factor_dtype if k in ("A", "B") else dtype).requires_grad_(k in grads)
        for k, v in tensors.items()
        if v is not None
    }
    index = index.to(device)
    x, w, A, B, bias = (leaves.get(k) for k in NAMES)
    if impl == "op":
        y = ck.lowrank_linear_segmented(x, w, A, B, index, scales=list(scales), ranks=ranks, bias=bias)
    else:
        s = torch.tensor(scales, dtype=torch.float64)
        full = index.reshape(index.shape + (1,) * (x.dim() - 1 - index.dim())).expand(x.shape[:-1])
        if impl == "spec":
            y = reference.lowrank_linear_segmented(x, w, A, B, full, s, ranks.to(device), bias)
        else:
            y = plain_segmented(x, w, A, B, index, s.to(dtype), ranks, bias)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(device, y.dtype)
    wrt = [k for k in NAMES if k in leaves and k in grads]
    out = {"y": y.detach()}
    if wrt:
        out.update(zip(wrt, torch.autograd.grad(y, [leaves[k] for k in wrt], dy)))
    return out


def max_rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), 1e-30)
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item() / scale


def assert_matches(got, expected, rtol):
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].shape == expected[k].shape, k
        err = max_rel_err(got[k], expected[k])
        assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol:.0e}"


PATTERNS = {
    "shuffled": dict(),
    "sorted": dict(pattern="sorted"),
    "all rows one adapter": dict(pattern="one"),
    "all rows -1": dict(pattern="none"),
    "unused adapters": dict(pattern="some"),
    "per token, 3-D x": dict(shape=(3, 8)),
    "per sequence": dict(shape=(5, 6), per_sequence=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_matches_spec_fp32(backend, pattern, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs(**PATTERNS[pattern])
    got = run(tensors, index, ranks, set(NAMES), dtype=torch.float32)
    expected = run(tensors, index, ranks, set(NAMES), dtype=torch.float64, impl="spec")
    assert_matches(got, expected, FP32_RTOL)
    for k in ("y", "x", "weight", "A", "B", "bias"):
        assert got[k].dtype == torch.float32, k
    if pattern in ("all rows -1", "unused adapters"):  # adapters without rows get exactly zero gradient
        used = set(index.unique().tolist())
        for a in range(len(RANKS)):
            if a not in used:
                assert not got["A"][a].any() and not got["B"][a].any(), a


# which tensors require grad
GRADS = {
    "factors only (frozen base, x)": {"A", "B"},
    "A frozen": {"x", "B", "bias"},
    "B frozen": {"x", "A"},
    "base only": {"weight", "bias"},
    "x only": {"x"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", list(GRADS))
def test_frozen_patterns(backend, grads, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(4, 5), per_sequence=True)
    got = run(tensors, index, ranks, GRADS[grads], dtype=torch.float32)
    expected = run(tensors, index, ranks, GRADS[grads], dtype=torch.float64, impl="spec")
    assert_matches(got, expected, FP32_RTOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_within_twice_plain_error(backend, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(31,), ranks=(8, 16, 4, 12))
    got = run(tensors, index, ranks, set(NAMES), dtype=torch.float16)
    plain = run(tensors, index, ranks, set(NAMES), dtype=torch.float16, impl="plain")
    expected = run(tensors, index, ranks, set(NAMES), dtype=torch.float64, impl="spec")
    for k in expected:
        assert got[k].dtype == torch.float16 and got[k].shape == expected[k].shape, k
        ours, yardstick = max_rel_err(got[k], expected[k]), max_rel_err(plain[k], expected[k])
        assert ours <= 2 * yardstick + 1e-5, f"{k}: {ours:.2e} vs plain fp16 {yardstick:.2e}"


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
def test_fp32_factors_on_16bit_follow_the_rounding_rule(backend, dtype, force_backend):
    """fp32 A/B on a 16-bit x/weight: the forward and dx/dweight/dbias equal, bit for bit, the
    same-dtype op given the factors rounded to the compute dtype; factor gradients come back fp32
    and at least as accurate as the same-dtype op's."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(3, 7))
    mixed = run(tensors, index, ranks, set(NAMES), dtype=dtype, factor_dtype=torch.float32)
    rounded = {k: v.to(dtype).double() for k, v in tensors.items()}
    same = run(rounded, index, ranks, set(NAMES), dtype=dtype)
    expected = run(rounded, index, ranks, set(NAMES), dtype=torch.float64, impl="spec")
    assert mixed["y"].dtype == dtype and torch.equal(mixed["y"], same["y"])
    for k in ("x", "weight", "bias"):
        assert mixed[k].dtype == dtype and torch.equal(mixed[k], same[k]), k
    for k in ("A", "B"):
        assert mixed[k].dtype == torch.float32, k
        ours, yardstick = max_rel_err(mixed[k], expected[k]), max_rel_err(same[k], expected[k])
        assert ours <= 2 * yardstick + 1e-5, f"{k}: {ours:.2e} vs same-dtype {yardstick:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_row_is_the_single_adapter_op_on_that_row(backend, force_backend):
    """Independent of the segmented spec: row m equals the single-adapter spec with adapter
    index[m]'s unpadded factors and scale (the base layer alone for -1); padding holds garbage."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(19,))
    t = tensors
    y = ck.lowrank_linear_segmented(
        *(t[k].float() for k in ("x", "weight", "A", "B")), index, scales=SCALES, ranks=ranks, bias=t["bias"].float()
    )
    for m, a in enumerate(index.tolist()):
        if a < 0:
            want = F.linear(t["x"][m], t["weight"], t["bias"])
        else:
            r = RANKS[a]
            want = single_reference.lowrank_linear(
                t["x"][m : m + 1], t["weight"], t["A"][a, :r], t["B"][a, :, :r], scale=SCALES[a], bias=t["bias"]
            )[0]
        assert max_rel_err(y[m], want) <= FP32_RTOL, (m, a)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_adapter_equals_the_single_adapter_op(backend, force_backend):
    """Every row on one unpadded adapter: output and every gradient as ck.lowrank_linear's."""
    force_backend(backend)
    tensors, _, _ = make_inputs(shape=(3, 7), ranks=(6,))
    index = torch.zeros(3, dtype=torch.int64)
    leaves = [{k: v.float().requires_grad_() for k, v in tensors.items()} for _ in range(2)]
    a, b = leaves
    y_seg = ck.lowrank_linear_segmented(a["x"], a["weight"], a["A"], a["B"], index, scales=0.7, bias=a["bias"])
    y_one = ck.lowrank_linear(b["x"], b["weight"], b["A"][0], b["B"][0], scale=0.7, bias=b["bias"])
    torch.testing.assert_close(y_seg, y_one, rtol=1e-6, atol=1e-6)
    dy = torch.randn(y_seg.shape, generator=torch.Generator().manual_seed(3))
    y_seg.backward(dy)
    y_one.backward(dy)
    for k in NAMES:
        torch.testing.assert_close(a[k].grad, b[k].grad, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_counts_and_gets_zero_gradient(backend, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs()
    zeroed = dict(tensors, A=tensors["A"].clone(), B=tensors["B"].clone())
    for a, r in enumerate(RANKS):
        zeroed["A"][a, r:] = 0
        zeroed["B"][a, :, r:] = 0
    got = run(tensors, index, ranks, set(NAMES), dtype=torch.float32)
    clean = run(zeroed, index, ranks, set(NAMES), dtype=torch.float32)
    no_ranks = run(zeroed, index, None, set(NAMES), dtype=torch.float32)  # zero padding alone does the same
    for k in ("y", "x", "weight", "bias"):
        assert max_rel_err(got[k], clean[k]) <= FP32_RTOL and max_rel_err(no_ranks[k], clean[k]) <= FP32_RTOL, k
    for a, r in enumerate(RANKS):
        assert not got["A"][a, r:].any() and not got["B"][a, :, r:].any(), a


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lists_of_per_adapter_factors(backend, force_backend):
    """Per-adapter lists of different ranks are packed (padding to the largest) and gradients reach
    the listed tensors in their own shapes."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(17,))
    t = {k: v.float() for k, v in tensors.items()}
    As = [t["A"][a, :r].clone().requires_grad_() for a, r in enumerate(RANKS)]
    Bs = [t["B"][a, :, :r].clone().requires_grad_() for a, r in enumerate(RANKS)]
    y = ck.lowrank_linear_segmented(t["x"], t["weight"], As, Bs, index, scales=SCALES, bias=t["bias"])
    want = run(tensors, index, ranks, {"A", "B"}, dtype=torch.float64, impl="spec")
    assert max_rel_err(y, want["y"]) <= FP32_RTOL
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).float()
    grads = torch.autograd.grad(y, As + Bs, dy)
    for a, r in enumerate(RANKS):
        assert grads[a].shape == (r, 37) and grads[len(RANKS) + a].shape == (29, r)
        assert max_rel_err(grads[a], want["A"][a, :r]) <= FP32_RTOL
        assert max_rel_err(grads[len(RANKS) + a], want["B"][a, :, :r]) <= FP32_RTOL
    A_stack, B_stack, packed_ranks = seg_ops.pack_adapters(As, Bs)
    assert A_stack.shape == (4, 8, 37) and B_stack.shape == (4, 29, 8) and packed_ranks.tolist() == list(RANKS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int32_index_and_tensor_scales(backend, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(2, 9), per_sequence=True)
    t = {k: v.float() for k, v in tensors.items()}
    args = (t["x"], t["weight"], t["A"], t["B"])
    want = ck.lowrank_linear_segmented(*args, index, scales=SCALES, ranks=ranks)
    got = ck.lowrank_linear_segmented(*args, index.int(), scales=torch.tensor(SCALES), ranks=ranks.int())
    assert torch.equal(got, want)
    one = ck.lowrank_linear_segmented(*args, index, scales=0.5, ranks=list(RANKS))
    assert torch.equal(one, ck.lowrank_linear_segmented(*args, index, scales=torch.tensor(0.5), ranks=ranks))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(0,))
    got = run(tensors, index, ranks, set(NAMES), dtype=torch.float32)
    assert got["y"].shape == (0, 29) and got["x"].shape == (0, 37)
    for k in ("weight", "A", "B", "bias"):
        assert not got[k].any(), k


def test_triton_token_split_with_atomics(force_backend):
    """Enough rows that the dA/dB reductions split each adapter's rows over several programs (fp32
    atomics), one adapter holding most of them."""
    force_backend("triton")
    tensors, _, ranks = make_inputs(shape=(300,), d_in=20, d_out=18, ranks=(3, 2))
    index = torch.zeros(300, dtype=torch.int64)
    index[::7], index[::11] = 1, -1
    grads, kw = {"x", "A", "B"}, dict(scales=(0.5, -1.5))
    got = run(tensors, index, ranks, grads, dtype=torch.float32, **kw)
    expected = run(tensors, index, ranks, grads, dtype=torch.float64, impl="spec", **kw)
    assert_matches(got, expected, FP32_RTOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend, force_backend):
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(17,))
    expected = run(tensors, index, ranks, set(NAMES), dtype=torch.float64, impl="spec")
    strided = dict(tensors)
    strided["x"] = tensors["x"].T.contiguous().T  # column-major
    strided["weight"] = tensors["weight"].T.contiguous().T
    strided["A"] = tensors["A"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["B"] = torch.stack([tensors["B"], tensors["B"]], -1)[..., 0]  # last-dim stride 2
    got = run(strided, index, ranks, set(NAMES), dtype=torch.float32)
    assert_matches(got, expected, FP32_RTOL)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_fp64(backend, force_backend):
    """The hand-written backward formulas against finite differences."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(7,), d_in=5, d_out=4, ranks=(2, 1, 3))
    leaves = [tensors[k].clone().requires_grad_() for k in NAMES]

    def fn(x, weight, A, B, bias):
        return ck.lowrank_linear_segmented(x, weight, A, B, index, scales=[0.5, 2.0, -1.0], ranks=ranks, bias=bias)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saves_only_what_the_gradients_need(backend, force_backend):
    """A frozen: x is not saved (u is); B frozen: u is not saved (x is, for dA)."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(4, 6), per_sequence=True)
    t = {k: v.float() for k, v in tensors.items()}
    x = t["x"].requires_grad_()

    def saved_by(trainable):
        for k in ("A", "B"):
            t[k].requires_grad_(k in trainable)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            y = ck.lowrank_linear_segmented(x, t["weight"], t["A"], t["B"], index, scales=SCALES, ranks=ranks)
        y.sum().backward()
        return saved

    frozen_a = saved_by({"B"})
    assert all(s.data_ptr() != x.data_ptr() for s in frozen_a)
    assert any(tuple(s.shape) == (24, 8) and s.dtype == torch.float32 for s in frozen_a)  # u
    frozen_b = saved_by({"A"})
    assert any(s.data_ptr() == x.data_ptr() for s in frozen_b)
    assert not any(tuple(s.shape) == (24, 8) for s in frozen_b)


def _op_args(t, index, ranks, bias=True):
    n = t["A"].shape[0]
    scales = torch.linspace(0.5, 2.0, n)
    flat = index.reshape(index.shape + (1,) * (t["x"].dim() - 1 - index.dim())).expand(t["x"].shape[:-1])
    return (t["x"], t["weight"], t["A"], t["B"], flat.reshape(-1), scales, ranks, t["bias"] if bias else None)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, force_backend):
    """The registered op (schema, fake kernel, autograd registration) with ranks and bias, and with neither."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(2, 5), d_in=12, d_out=10, per_sequence=True)
    t = {k: v.float().requires_grad_(k in ("x", "A", "B", "bias")) for k, v in tensors.items()}
    torch.library.opcheck(seg_ops._segmented_op, _op_args(t, index, ranks))
    plain, index, _ = make_inputs(shape=(6,), d_in=12, d_out=10, ranks=(3, 3))
    p = {k: v.float().requires_grad_(k in ("weight", "B")) for k, v in plain.items()}
    torch.library.opcheck(seg_ops._segmented_op, _op_args(p, index, None, bias=False))


def test_compile_fullgraph_aot_eager(force_backend):
    force_backend("torch")
    tensors, index, ranks = make_inputs(shape=(3, 5), per_sequence=True)
    t = {k: v.float() for k, v in tensors.items()}

    def step(x, A, B, bias):
        y = ck.lowrank_linear_segmented(x, t["weight"], A, B, index, scales=SCALES, ranks=ranks, bias=bias)
        return torch.tanh(y).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t[k].clone().requires_grad_() for k in ("x", "A", "B", "bias")]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_autocast_runs_the_op_in_bf16(backend, force_backend):
    """Under CPU bf16 autocast fp32 x/weight/bias are cast to bf16, fp32 factors stay fp32 (rounded
    inside, fp32 gradients): exactly the op on bf16-cast inputs."""
    force_backend(backend)
    tensors, index, ranks = make_inputs(shape=(3, 7), per_sequence=True)
    leaves = {k: v.float().requires_grad_() for k, v in tensors.items()}
    kw = dict(scales=SCALES, ranks=ranks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ck.lowrank_linear_segmented(
            *(leaves[k] for k in ("x", "weight", "A", "B")), index, bias=leaves["bias"], **kw
        )
    assert y.dtype == torch.bfloat16
    cast = {k: v.detach().to(torch.bfloat16 if k in ("x", "weight", "bias") else v.dtype) for k, v in leaves.items()}
    cast = {k: v.requires_grad_() for k, v in cast.items()}
    y_cast = ck.lowrank_linear_segmented(*(cast[k] for k in ("x", "weight", "A", "B")), index, bias=cast["bias"], **kw)
    assert torch.equal(y, y_cast)
    dy = torch.randn(y.shape, dtype=torch.bfloat16)
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    want = torch.autograd.grad(y_cast, list(cast.values()), dy)
    for k, g, w in zip(leaves, got, want):
        assert g.dtype == leaves[k].dtype, k
        assert torch.equal(g, w.to(g.dtype)), k


def test_autocast_registered_op_and_fp64():
    """The registered op's autocast kernel casts as the eager path does; fp64 is left alone."""
    tensors, index, ranks = make_inputs(shape=(2, 4), per_sequence=True)
    t = {k: v.float() for k, v in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, u = seg_ops._segmented_op(*_op_args(t, index, ranks))
        y64 = ck.lowrank_linear_segmented(*(tensors[k] for k in ("x", "weight", "A", "B")), index, ranks=ranks)
    assert y.dtype == torch.bfloat16 and u.dtype == torch.float32
    assert y64.dtype == torch.float64


def test_forced_triton_cannot_run_bf16_interpreted(force_backend):
    force_backend("triton")
    tensors, index, ranks = make_inputs()
    with pytest.raises(RuntimeError, match="triton backend of lowrank_linear_segmented cannot run on cpu"):
        ck.lowrank_linear_segmented(*(tensors[k].bfloat16() for k in ("x", "weight", "A", "B")), index)


# ----------------------------------------------------------------------------------------------
# agreement with PEFT's mixed-batch forward (``adapter_names=``)

PEFT_ADAPTERS = {"a0": dict(r=4, lora_alpha=8), "a1": dict(r=2, lora_alpha=3, use_rslora=True), "a2": dict(r=8)}
PEFT_ROWS = ["a1", "__base__", "a0", "a2", "a1"]


def _peft_model(base: nn.Module, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    configs = {
        name: LoraConfig(target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **kw)
        for name, kw in PEFT_ADAPTERS.items()
    }
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    return model.eval()


def _route_through_ours(model, index_of_row: dict):
    """Every PEFT LoRA Linear of ``model`` runs our op on PEFT's own tensors (lists of its
    parameters, its scalings), with the per-row index in ``index_of_row["index"]``."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    names = list(PEFT_ADAPTERS)

    def forward(self, x, *args, **kwargs):
        return ck.lowrank_linear_segmented(
            x,
            self.base_layer.weight,
            [self.lora_A[a].weight for a in names],
            [self.lora_B[a].weight for a in names],
            index_of_row["index"],
            scales=[self.scaling[a] for a in names],
            bias=self.base_layer.bias,
        )

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    return layers


def _row_index(rows):
    names = list(PEFT_ADAPTERS)
    return torch.tensor([names.index(r) if r in names else -1 for r in rows])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_agrees_with_peft_mixed_batch_per_row(backend, force_backend):
    """One PEFT LoRA layer with three adapters of ranks 4 / 2 (rsLoRA scaling) / 8 and a bias: PEFT's
    mixed-batch forward and ours agree per row, -1 rows being PEFT's ``__base__``."""
    pytest.importorskip("peft")
    force_backend(backend)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 20)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = _peft_model(One(), ["proj"])
    x = torch.randn(len(PEFT_ROWS), 6, 24)
    with torch.no_grad():
        want = model(x, adapter_names=PEFT_ROWS)
        state = {"index": _row_index(PEFT_ROWS)}
        _route_through_ours(model, state)
        got = model(x)
    for m, name in enumerate(PEFT_ROWS):
        assert max_rel_err(got[m], want[m]) <= FP32_RTOL, (m, name)


def test_agrees_with_peft_on_a_llama_model(force_backend):
    """A tiny Llama with the three adapters on every attention and MLP projection: logits of PEFT's
    mixed batch equal ours row by row, and the adapters' gradients (ours land on PEFT's own parameters)
    agree with PEFT's."""
    pytest.importorskip("peft")
    from corda_kernels.testing import tiny_llama

    force_backend("torch")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = _peft_model(tiny_llama(layers=1), targets)
    ids = torch.randint(0, 128, (len(PEFT_ROWS), 7), generator=torch.Generator().manual_seed(0))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    want = model(input_ids=ids, adapter_names=PEFT_ROWS).logits
    want_grads = torch.autograd.grad(want.square().mean(), params)
    _route_through_ours(model, {"index": _row_index(PEFT_ROWS)})
    got = model(input_ids=ids).logits
    got_grads = torch.autograd.grad(got.square().mean(), params)
    for m in range(len(PEFT_ROWS)):
        assert max_rel_err(got[m], want[m]) <= 1e-4, m
    for p, g, w in zip(params, got_grads, want_grads):
        assert max_rel_err(g, w) <= 1e-4, p.shape


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the tensor


def _bad_inputs():
    tensors, index, ranks = make_inputs(shape=(6,), d_in=8, d_out=7, ranks=(2, 3))
    base = dict(
        x=tensors["x"].float(),
        weight=tensors["weight"].float(),
        A=tensors["A"].float(),
        B=tensors["B"].float(),
        adapter_index=index,
        scales=[1.0, 0.5],
        ranks=ranks,
        bias=tensors["bias"].float(),
    )
    lists = dict(ranks=None, A=[torch.randn(2, 8), torch.randn(3, 8)], B=[torch.randn(7, 2), torch.randn(7, 3)])

    def case(exc, match, **changes):
        kw = dict(base)
        kw.update(changes)
        return pytest.param(kw, exc, match, id=match[:48])

    return [
        case(ValueError, "adapter_index holds 2, out of range for 2 adapters", adapter_index=torch.tensor([0, 2] * 3)),
        case(ValueError, "adapter_index holds -2, out of range", adapter_index=torch.full((6,), -2)),
        case(ValueError, "adapter_index has shape (5,) but x (6, 8) needs", adapter_index=index[:5]),
        case(
            TypeError, "adapter_index must be an int64 or int32 tensor, got torch.float32", adapter_index=index.float()
        ),
        case(TypeError, "adapter_index must be an int64 or int32 tensor, got list", adapter_index=[0] * 6),
        case(ValueError, "device mismatch: adapter_index is on meta", adapter_index=index.to("meta")),
        case(TypeError, "dtype mismatch: A is torch.float64 but weight is torch.float32", A=base["A"].double()),
        case(TypeError, "dtype mismatch: B is torch.float16", B=base["B"].half()),
        case(ValueError, "device mismatch: B is on meta but weight is on cpu", B=base["B"].to("meta")),
        case(
            TypeError,
            "adapters of mixed dtypes: B[1] is torch.float16 but A[0] is torch.float32",
            **dict(lists, B=[torch.randn(7, 2), torch.randn(7, 3).half()]),
        ),
        case(
            ValueError,
            "adapters on mixed devices: A[1] is on meta but A[0] is on cpu",
            **dict(lists, A=[torch.randn(2, 8), torch.randn(3, 8, device="meta")]),
        ),
        case(
            ValueError,
            "B[1] (7, 2) does not match A[1] (3, 8)",
            **dict(lists, B=[torch.randn(7, 2), torch.randn(7, 2)]),
        ),
        case(ValueError, "2 A factors but 1 B factors", **dict(lists, B=[torch.randn(7, 2)])),
        case(ValueError, "ranks comes from the per-adapter lists", **dict(lists, ranks=[2, 3])),
        case(ValueError, "scales has 3 entries but there are 2 adapters", scales=[1.0, 2.0, 3.0]),
        case(ValueError, "scales has shape (3,) but there are 2 adapters", scales=torch.ones(3)),
        case(ValueError, "scales must be finite, got nan", scales=[1.0, math.nan]),
        case(TypeError, "scales must hold real numbers, got str", scales=["1", 2.0]),
        case(ValueError, "ranks holds 4, out of range [1, 3]", ranks=[2, 4]),
        case(ValueError, "ranks has shape (3,) but there are 2 adapters", ranks=torch.tensor([1, 2, 3])),
        case(ValueError, "disagree on the number of adapters", B=torch.randn(3, 7, 3)),
        case(ValueError, "disagree on the padded rank: B must be (2, 7, 3)", B=torch.randn(2, 7, 2)),
        case(ValueError, "A (2, 3, 9) has 9 columns but in_features is 8", A=torch.randn(2, 3, 9)),
        case(ValueError, "B (2, 6, 3) has 6 rows but out_features is 7", B=torch.randn(2, 6, 3)),
        case(ValueError, "A must be 3-D (n_adapters, r_max, in_features)", A=torch.randn(3, 8)),
        case(ValueError, "bias must have shape (7,)", bias=torch.randn(8)),
        case(ValueError, "x (6, 9) must end in in_features=8", x=torch.randn(6, 9)),
        case(TypeError, "dtype mismatch: x is torch.float64 but weight is torch.float32", x=torch.randn(6, 8).double()),
    ]


@pytest.mark.parametrize("kw,exc,match", _bad_inputs())
def test_bad_input(kw, exc, match):
    kw = dict(kw)
    args = [kw.pop(k) for k in ("x", "weight", "A", "B", "adapter_index")]
    with pytest.raises(exc, match=re.escape(match)) as info:
        ck.lowrank_linear_segmented(*args, **kw)
    assert str(info.value).startswith("lowrank_linear_segmented: "), info.value


def test_index_values_can_go_unchecked():
    """validate_indices=False skips reading the index (a sync on GPU): the caller vouches for it."""
    tensors, index, ranks = make_inputs(shape=(6,), d_in=8, d_out=7, ranks=(2, 3))
    t = {k: v.float() for k, v in tensors.items()}
    y = ck.lowrank_linear_segmented(t["x"], t["weight"], t["A"], t["B"], index, ranks=ranks, validate_indices=False)
    assert y.shape == (6, 7)


# ----------------------------------------------------------------------------------------------
# GPU (real Triton, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_adapters,pattern", [(4, "shuffled"), (16, "some"), (64, "shuffled"), (3, "one")])
def test_gpu_matches_spec(dtype, n_adapters, pattern, force_backend, cuda_device):
    force_backend("triton")
    ranks = tuple(8 + (56 * a) // max(n_adapters - 1, 1) for a in range(n_adapters))  # 8 .. 64
    tensors, index, ranks = make_inputs(shape=(1500,), d_in=320, d_out=200, ranks=ranks, pattern=pattern)
    kw = dict(device=cuda_device)
    got = run(tensors, index, ranks, set(NAMES), dtype=dtype, **kw)
    expected = run(tensors, index, ranks, set(NAMES), dtype=torch.float64, impl="spec", **kw)
    if dtype == torch.float32:
        assert_matches(got, expected, FP32_RTOL)
        return
    plain = run(tensors, index, ranks, set(NAMES), dtype=dtype, impl="plain", **kw)
    for k in expected:
        ours, yardstick = max_rel_err(got[k], expected[k]), max_rel_err(plain[k], expected[k])
        assert ours <= 2 * yardstick + 1e-5, f"{k}: {ours:.2e} vs plain {dtype} {yardstick:.2e}"
