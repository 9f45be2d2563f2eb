"""LowRankLinear: parameters vs buffers, forward/backward through the op, merge/unmerge,
to_linear/from_linear, state_dict round trips, validation and torch.compile."""

import pytest
import torch
from torch import nn

from corda_kernels.kernels.reference import lowrank_linear as reference
from corda_kernels.nn import LowRankLinear

D_IN, D_OUT, R = 13, 11, 3


def factors(seed=0, *, rows=None, cols=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n_rows = D_OUT if rows is None else len(rows)
    n_cols = D_IN if cols is None else len(cols)

    def randn(*s):
        return torch.randn(*s, generator=g).to(dtype)

    return dict(
        weight=randn(D_OUT, D_IN),
        A=randn(R, n_cols),
        B=randn(n_rows, R),
        diag=randn(R),
        bias=randn(D_OUT),
        row_index=None if rows is None else torch.tensor(rows),
        col_index=None if cols is None else torch.tensor(cols),
    )


ROWS, COLS = [0, 3, 4, 8, 10], [1, 2, 5, 7, 9, 12]


def make(seed=0, *, partial=True, trainable=("A", "B"), dropout=0.0, scale=0.5, dtype=torch.float32):
    f = factors(seed, rows=ROWS if partial else None, cols=COLS if partial else None, dtype=dtype)
    return LowRankLinear(
        f["weight"],
        f["A"],
        f["B"],
        bias=f["bias"],
        scale=scale,
        diag=f["diag"],
        row_index=f["row_index"],
        col_index=f["col_index"],
        trainable=trainable,
        dropout=dropout,
    )


def spec(layer, x, **override):
    """The reference spec with the layer's tensors (``override`` replaces some of them)."""
    t = {n: override.get(n, getattr(layer, n)) for n in ("weight", "A", "B", "bias", "diag", "row_index", "col_index")}
    return reference.lowrank_linear(
        x,
        t["weight"],
        t["A"],
        t["B"],
        scale=layer.scale,
        bias=t["bias"],
        row_index=t["row_index"],
        col_index=t["col_index"],
        diag=t["diag"],
    )


@pytest.mark.parametrize(
    "trainable,params",
    [
        (("A", "B"), {"A", "B"}),
        (("B",), {"B"}),
        (("diag",), {"diag"}),
        ("B", {"B"}),
        ((), set()),
        (("A", "B", "diag"), {"A", "B", "diag"}),
    ],
)
def test_parameters_and_buffers(trainable, params):
    layer = make(trainable=trainable)
    trainable_names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable_names == params
    assert {n for n, _ in layer.named_parameters()} == params | {"weight", "bias"}
    assert {n for n, _ in layer.named_buffers()} == ({"A", "B", "diag"} - params) | {
        "row_index",
        "col_index",
        "merged_state",
    }
    assert set(layer.state_dict()) == {"weight", "bias", "A", "B", "diag", "row_index", "col_index", "merged_state"}
    assert (layer.in_features, layer.out_features, layer.rank) == (D_IN, D_OUT, R)
    x = torch.randn(2, 4, D_IN, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None
    for name in ("A", "B", "diag", "weight", "bias"):
        t = getattr(layer, name)
        assert (t.grad is not None) == (name in params), name


def test_optional_tensors_absent():
    f = factors()
    layer = LowRankLinear(f["weight"], f["A"], f["B"])
    assert layer.bias is None and layer.diag is None and layer.row_index is None and layer.col_index is None
    assert set(layer.state_dict()) == {"weight", "A", "B", "merged_state"}
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(layer(x), x @ (f["weight"] + f["B"] @ f["A"]).T)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_backward_match_spec(backend, force_backend):
    force_backend(backend)
    layer = make(trainable=("A", "B", "diag"))
    x = torch.randn(3, 7, D_IN, requires_grad=True)
    y = layer(x)
    ref_params = {n: getattr(layer, n).detach().clone().requires_grad_() for n in ("A", "B", "diag")}
    x_ref = x.detach().clone().requires_grad_()
    y_ref = spec(layer, x_ref, **ref_params)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for n, v in ref_params.items():
        torch.testing.assert_close(getattr(layer, n).grad, v.grad)


def test_dropout_only_in_training():
    layer = make(dropout=0.5)
    x = torch.randn(6, D_IN)
    layer.eval()
    torch.testing.assert_close(layer(x), spec(layer, x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(0)
    y2 = layer(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, spec(layer, x))


@pytest.mark.parametrize("partial", [True, False])
def test_delta_weight_merge_unmerge(partial):
    layer = make(partial=partial)
    x = torch.randn(4, D_IN)
    y = layer(x)
    dw = layer.delta_weight()
    assert dw.dtype == torch.float32 and dw.shape == (D_OUT, D_IN)
    if partial:  # rows/cols outside the index sets get no update
        outside_rows = sorted(set(range(D_OUT)) - set(ROWS))
        outside_cols = sorted(set(range(D_IN)) - set(COLS))
        assert dw[outside_rows].abs().max() == 0 and dw[:, outside_cols].abs().max() == 0
    torch.testing.assert_close(x @ (layer.weight + dw).T + layer.bias, y)
    w0 = layer.weight.detach().clone()
    assert layer.merge() is layer and layer.merged and bool(layer.merged_state)
    torch.testing.assert_close(layer.weight, w0 + dw)
    torch.testing.assert_close(layer(x), y)
    layer.merge()  # a second merge changes nothing
    torch.testing.assert_close(layer.weight, w0 + dw)
    layer.unmerge()
    assert not layer.merged and not bool(layer.merged_state)
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), y)


def test_merge_in_bf16_rounds_once():
    layer = make(dtype=torch.bfloat16)
    expected = (layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.weight, expected)


@pytest.mark.parametrize("merged", [False, True])
def test_to_linear(merged):
    layer = make()
    x = torch.randn(4, D_IN)
    y = layer(x)
    if merged:
        layer.merge()
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.dtype == layer.weight.dtype
    torch.testing.assert_close(linear(x), y)
    assert layer.merged == merged


def test_from_linear():
    f = factors()
    linear = nn.Linear(D_IN, D_OUT)
    layer = LowRankLinear.from_linear(linear, f["A"], f["B"], scale=2.0, trainable=("B",))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x) + 2.0 * x @ f["A"].T @ f["B"].T)
    residual = linear.weight.detach() - 2.0 * f["B"] @ f["A"]
    pissa = LowRankLinear.from_linear(linear, f["A"], f["B"], residual=residual, scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(pissa(x), linear(x))
    with pytest.raises(ValueError, match=r"residual \(11, 12\) must have the linear's weight shape \(11, 13\)"):
        LowRankLinear.from_linear(linear, f["A"], f["B"], residual=torch.randn(D_OUT, D_IN - 1))


@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_round_trip(merged):
    layer = make(seed=0, trainable=("B", "diag"))
    with torch.no_grad():
        layer.B.add_(1.0)  # "trained"
    if merged:
        layer.merge()
    fresh = make(seed=1, trainable=("B", "diag"))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged == merged
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(fresh(x), layer(x))
    for name, t in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    fresh.unmerge()
    layer.unmerge()
    torch.testing.assert_close(fresh.weight, layer.weight)


def _noncontiguous(t):
    """``t``'s values in a transposed (or strided) layout, as a decomposition may hand them over."""
    if t.dim() == 2:
        return t.T.contiguous().T
    return torch.stack([t, t], -1)[..., 0] if t.dim() else t


def _owns_its_storage(t):
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def test_stores_contiguous_tensors_whatever_it_is_given(tmp_path):
    """Transposed factors (CorDA's A came as a (1, r) strided view) made the layer unsaveable:
    safetensors and transformers' save_pretrained view tensors flat. The layer stores contiguous
    copies of whatever it is given, and loading (also with assign=True) keeps them contiguous."""
    from safetensors.torch import load_file, save_file

    f = factors(0, rows=ROWS, cols=COLS)
    given = {k: _noncontiguous(v) for k, v in f.items()}
    assert not any(v.is_contiguous() for v in given.values())
    for trainable in (("A", "B"), ("B",), ("diag",)):
        layer = LowRankLinear(
            given["weight"],
            given["A"],
            given["B"],
            bias=given["bias"],
            diag=given["diag"],
            row_index=given["row_index"],
            col_index=given["col_index"],
            trainable=trainable,
            scale=0.5,
        )
        tensors = dict(layer.state_dict())
        assert all(_owns_its_storage(t) for t in tensors.values()), {k: t.stride() for k, t in tensors.items()}
        save_file(tensors, tmp_path / "layer.safetensors")
        assert all(torch.equal(load_file(tmp_path / "layer.safetensors")[k], t) for k, t in tensors.items())
        for assign in (False, True):
            fresh = make(seed=1, trainable=trainable)
            fresh.load_state_dict({k: _noncontiguous(t) for k, t in tensors.items()}, assign=assign)
            state = fresh.state_dict()
            assert all(_owns_its_storage(t) for t in state.values()), (
                assign,
                {k: t.stride() for k, t in state.items()},
            )
            assert all(torch.equal(state[k], t) for k, t in tensors.items())
            x = torch.randn(4, D_IN)
            torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_load_rejects_bad_indices():
    layer = make()
    state = layer.state_dict()
    state["row_index"] = torch.tensor([0, 3, 3, 8, 10])
    with pytest.raises(ValueError, match="row_index holds duplicated entries"):
        make(seed=1).load_state_dict(state)


def test_half_conversion_keeps_indices():
    layer = make().half()
    assert layer.weight.dtype == torch.float16 and layer.A.dtype == torch.float16
    assert layer.row_index.dtype == torch.int64 and layer.merged_state.dtype == torch.bool


def test_extra_repr():
    text = repr(make(trainable=("diag",), dropout=0.1))
    for part in (
        "in_features=13",
        "out_features=11",
        "rank=3",
        "scale=0.5",
        "rows=5/11",
        "cols=6/13",
        "diag=True",
        "trainable=('diag',)",
        "dropout=0.1",
        "merged=False",
    ):
        assert part in text, part


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(trainable=("A", "C")), ValueError, r"trainable may name \('A', 'B', 'diag'\), got \['C'\]"),
        (dict(trainable=("diag",), diag=None), ValueError, "trainable names 'diag' but no diag was given"),
        (dict(dropout=1.5), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(row_index=torch.tensor([0, 3, 4, 8, 11])), ValueError, "row_index holds 11, out of range"),
        (dict(bias=torch.randn(3)), ValueError, r"bias must have shape \(11,\)"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    f = factors(rows=ROWS, cols=COLS)
    f.update(kwargs)
    weight, A, B = f.pop("weight"), f.pop("A"), f.pop("B")
    with pytest.raises(exc, match=match):
        LowRankLinear(weight, A, B, **f)


def _two_layer_model():
    torch.manual_seed(0)
    first = make(seed=0, trainable=("B",))
    f = factors(seed=2)
    second = LowRankLinear(
        f["weight"][:, :D_OUT].contiguous(),
        f["A"][:, :D_OUT].contiguous(),
        f["B"],
        diag=f["diag"],
        trainable=("diag",),
        dropout=0.3,
    )
    return nn.Sequential(first, nn.Tanh(), second)


def test_compile_fullgraph_training_step():
    model = _two_layer_model()
    x = torch.randn(2, 5, D_IN)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    model.train()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        torch.manual_seed(3)
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


def test_compile_inductor():
    layer = make(partial=True, trainable=("B",))
    x = torch.randn(4, D_IN, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.B.grad is not None and x.grad is not None


def test_slices_of_a_batch_are_copied_out():
    """Layers decomposed as a batch got views into one storage (A[i], B[i]): with a strided layout,
    transformers' save_pretrained failed on them; each layer now holds its own storage."""
    f = factors(0)
    batch_A, batch_B = torch.stack([f["A"], f["A"] + 1]), torch.stack([f["B"], f["B"] + 1])
    layers = [LowRankLinear(f["weight"], batch_A[i], batch_B[i]) for i in range(2)]
    for layer in layers:
        assert all(_owns_its_storage(t) for t in layer.state_dict().values())
    assert layers[0].A.data_ptr() != batch_A.data_ptr() and torch.equal(layers[1].A, batch_A[1])


# ---------------------------------------------------------------------------------------------
# several named adapters on one layer (issue 24, part 4)


def _named_layer():
    """fp64 layer: its own PiSSA-like adapter turned back onto the original weight (A0, B0), a
    Partial-LoRA adapter, a SiVA-like one (frozen A, B, trainable diag) and a subtractive one."""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    W, bias = r(9, 7), r(9)
    A0, B0 = r(3, 7), r(9, 3)
    layer = LowRankLinear(W - 0.5 * B0 @ A0, A0 + 0.1 * r(3, 7), B0 + 0.1 * r(9, 3), bias=bias, scale=0.5)
    layer.base_changed = True
    layer.use_original_base(A0, B0)
    layer.add_adapter(
        "part",
        r(2, 4),
        r(5, 2),
        scale=2.0,
        row_index=torch.tensor([0, 2, 3, 8, 6]),
        col_index=torch.tensor([6, 1, 0, 4]),
    )
    layer.add_adapter("siva", r(2, 7), r(9, 2), scale=1.5, diag=r(2), trainable=("diag",))
    S0, T0 = r(2, 7), r(9, 2)
    layer.add_adapter("sub", S0 + 0.1 * r(2, 7), T0 + 0.1 * r(9, 2), scale=0.75, initial=(S0, T0))
    return layer, W, bias


def _oracle(layer, W, bias, name):
    """``W + b + s·delta`` of adapter ``name`` from its own tensors, dense fp64."""
    o = layer.adapter(name)
    A, B = o.A, o.B
    if o.diag is not None:
        A = A * o.diag[:, None]
    dense = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    rows = torch.arange(layer.out_features) if o.row_index is None else o.row_index
    cols = torch.arange(layer.in_features) if o.col_index is None else o.col_index
    dense[rows[:, None], cols[None, :]] = B @ A
    if getattr(o, "A0", None) is not None:
        dense = dense - o.B0 @ o.A0
    return W + o.scale * dense, bias


def test_named_adapters_keep_the_first_ones_output():
    layer, W, bias = _named_layer()
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-12)  # the original weight is back
    x = torch.randn(4, 7, dtype=torch.float64)
    w, b = _oracle(layer, W, bias, "default")
    torch.testing.assert_close(layer(x), x @ w.T + b, rtol=0, atol=1e-12)
    assert layer.adapter_names == ("default", "part", "siva", "sub") and layer.active_adapter == "default"


@pytest.mark.parametrize(
    "rows",
    [[3, 0, -1, 1, 2, 3], [2, 2, 2, 2, 2, 2], [-1, -1, 0, 0, 1, 1], [-1] * 6],
    ids=["each", "one", "repeat", "base"],
)
def test_per_row_equals_each_adapter_alone(rows):
    layer, W, bias = _named_layer()
    names = layer.adapter_names
    x = torch.randn(6, 3, 7, dtype=torch.float64)
    want = torch.stack(
        [
            x[i] @ W.T + bias if a < 0 else x[i] @ _oracle(layer, W, bias, names[a])[0].T + bias
            for i, a in enumerate(rows)
        ]
    )
    torch.testing.assert_close(layer(x, adapter_index=torch.tensor(rows)), want, rtol=0, atol=1e-12)
    per_token = torch.tensor(rows, dtype=torch.int32)[:, None].expand(6, 3)
    torch.testing.assert_close(layer(x, adapter_index=per_token), want, rtol=0, atol=1e-12)
    as_names = [None if a < 0 else names[a] for a in rows]
    torch.testing.assert_close(layer(x, adapter_index=as_names), want, rtol=0, atol=1e-12)
    for name in names:  # the active adapter alone agrees too
        layer.set_adapter(name)
        torch.testing.assert_close(layer(x[0]), x[0] @ _oracle(layer, W, bias, name)[0].T + bias, rtol=0, atol=1e-12)


def test_per_row_gradients_match_the_oracle():
    layer, W, bias = _named_layer()
    names = layer.adapter_names
    owners = [layer.adapter(n) for n in names]
    params = [getattr(o, f) for o in owners for f in o.trainable]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(5, 7, dtype=torch.float64)
    rows = [1, 3, -1, 2, 0]
    got = torch.autograd.grad(layer(x, adapter_index=torch.tensor(rows)).square().sum(), params)
    want_y = torch.stack(
        [
            x[i] @ W.T + bias if a < 0 else x[i] @ _oracle(layer, W, bias, names[a])[0].T + bias
            for i, a in enumerate(rows)
        ]
    )
    want = torch.autograd.grad(want_y.square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_named_adapter_merge_delete_and_undo():
    layer, W, bias = _named_layer()
    x = torch.randn(4, 7, dtype=torch.float64)
    layer.set_adapter("part")
    want = layer(x)
    layer.merge()  # summed in fp32 (as every merge)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="merged"):
        layer(x, adapter_index=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="merged"):
        layer.set_adapter("default")
    layer.unmerge()
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    layer.delete_adapter("part")
    assert layer.active_adapter == "default" and "part" not in layer.adapter_names
    with pytest.raises(ValueError, match="unknown adapter 'part'"):
        layer.set_adapter("part")
    for name in ("siva", "sub"):
        layer.delete_adapter(name)
    before = layer(x)
    layer.restore_residual_base()  # back to the residual: the same outputs
    assert not layer.on_original_base
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)


def test_named_adapters_state_dict_round_trip():
    layer, _, _ = _named_layer()
    other, _, _ = _named_layer()
    with torch.no_grad():
        layer.adapter("part").A.add_(1.0)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 7, dtype=torch.float64)
    rows = torch.tensor([1, 0, 3])
    torch.testing.assert_close(other(x, adapter_index=rows), layer(x, adapter_index=rows), rtol=0, atol=0)


def test_per_row_packed_factors_follow_changes():
    """The packed stacks are reused without gradients, and rebuilt once a factor changes (in place
    or by swapping its storage) or an adapter is added."""
    layer, W, bias = _named_layer()
    x = torch.randn(4, 7, dtype=torch.float64)
    rows = torch.tensor([1, 3, 0, 2])
    with torch.no_grad():
        layer(x, adapter_index=rows)
        layer.adapter("part").B.add_(1.0)
        layer.adapter("sub").A.data = torch.zeros_like(layer.adapter("sub").A)
        got = layer(x, adapter_index=rows)
        want = [x[i] @ _oracle(layer, W, bias, layer.adapter_names[a])[0].T + bias for i, a in enumerate(rows.tolist())]
        torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-12)
        layer.add_adapter("new", torch.ones(1, 7, dtype=torch.float64), torch.ones(9, 1, dtype=torch.float64))
        got = layer(x, adapter_index=torch.tensor([4, 4, -1, 4]))
        torch.testing.assert_close(
            got[0], x[0] @ (W + torch.ones(9, 7, dtype=torch.float64)).T + bias, rtol=0, atol=1e-12
        )
