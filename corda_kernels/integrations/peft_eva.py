"""PEFT's EVA (``init_lora_weights="eva"``) on corda_kernels' engine (used by the global PEFT patch).

Replaces ``peft.tuners.lora.eva._get_eva_state_dict`` (PEFT 0.21), which both
``get_eva_state_dict`` and ``initialize_lora_eva_weights`` call, and keeps its control flow
line for line: the same batches (the first one twice: once to find layers with equal inputs, then
cycling the dataloader), the same ``prepare_model_inputs_fn`` / ``prepare_layer_inputs_fn`` calls,
the same per-layer convergence rule (after each batch a layer's components are compared with the
previous batch's by cosine similarity against ``tau``; a layer whose first ``rank`` components
have converged stops receiving data, and gets it again if the redistribution raises its rank),
the same rank redistribution by explained variance ratio (``rho``, the budget, equal-input layers),
``whiten`` and its output (``rank x in_features`` fp32 components, PEFT's sign convention).

The components: PEFT's ``IncrementalPCA`` (centered by the running mean, in its way) takes, after
each batch, the top ``k`` right singular vectors of ``X = [diag(S) Vt; batch − batch mean; mean
correction]`` (its previous ``k`` components stacked on the new data) by a randomized SVD
(``torch.svd_lowrank``, ``q = 2k``, 4 iterations). Ours solves for them exactly: while ``X``
(``n x d``, ``n = k + batch + 1``) has fewer rows than columns, from its ``n x n`` Gram matrix
``X·Xᵀ = U S² Uᵀ`` in fp64 (top-``k`` eigenpairs, then ``V = Xᵀ U S⁻¹``); otherwise from the
``d x d`` matrix ``Xᵀ X`` (:func:`covariance_update`, fp32) by
:func:`~corda_kernels.linalg.eigen.top_eigenpairs`, warm-started from the previous batch's basis.
Same-shape layers are solved together. The running mean and variance are PEFT's own function (fp64),
so the explained variance ratios are PEFT's ``S² / Σ var·n``; components carry PEFT's sign rule and
dtypes (fp64 from the second batch on, as PEFT's). Layers with equal inputs are found by a hash of
the input's bytes (PEFT: a Python hash of the input as a list of floats; the same partition, far
cheaper). With PEFT's default ``forward_fn``, each forward of the loop stops once every layer still
collecting has had its input (PEFT discards the output): :class:`_EarlyExit`; with its default
input preparation too, the passes after the first over PEFT's cycled batches feed the hooks the
layer inputs recorded in the first instead of running the model: :class:`_Replay`.

So ours is PEFT's algorithm with an exact SVD per step: the components differ from PEFT's by its
randomized SVD's error, and where that error moves a layer's cosine similarity across ``tau`` at
another batch, the layer stops after a different number of batches than PEFT's. A distributed run
that gathers inputs, or any error in our code, runs PEFT's own function (one log line); bad input
thus raises PEFT's own error.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
from collections.abc import Mapping
from copy import deepcopy
from typing import Any, Callable

import torch

from ..linalg._eigh import eigh_range
from ..linalg._products import gram_lower
from ..linalg.eigen import top_eigenpairs
from ..ops.covariance import covariance_update, symmetrize_
from .hf import StopForward

logger = logging.getLogger("corda_kernels.peft")

_classes_cache: dict[str, Any] = {}


def _eva():
    return importlib.import_module("peft.tuners.lora.eva")


def _hook_classes():
    """``(KeyHook, CovarianceHook)``: subclasses of PEFT's ``_Hook`` (its input preparation and
    distributed gathering, and its check that no EVA hook is left behind)."""
    if "classes" in _classes_cache:
        return _classes_cache["classes"]
    base = _eva()._Hook

    class KeyHook(base):
        """Records a key of each input (PEFT's ``HashHook``: equal keys, equal inputs)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hashed_inputs = []

        @torch.no_grad()
        def __call__(self, model, input, output):
            x = self.gather_layer_inputs(self.prepare_layer_inputs(input))
            self.hashed_inputs.append(_input_key(x, self))

    class CovarianceHook(base):
        """PEFT's ``SVDHook`` with the incremental PCA replaced by an exact centered scatter matrix."""

        def __init__(self, n_components: int, sim_thresh, **kwargs):
            super().__init__(**kwargs)
            if isinstance(sim_thresh, torch.Tensor) and len(sim_thresh.shape) > 0:
                check1 = sim_thresh.size(0) == n_components or sim_thresh.size(0) == 1
                if not (check1 and len(sim_thresh.shape) == 1):
                    raise ValueError(
                        "if sim_thresh is a tensor with more than 0 dimensions it must have shape "
                        "(n_components,) or (1,)"
                    )
            self.n_components = n_components
            self.sim_thresh = sim_thresh
            self.converged = torch.zeros((n_components,), dtype=torch.bool)
            self.n_features = None
            self.mean_ = self.var_ = None
            self.n_samples_seen_ = None
            self.components_ = self.singular_values_ = self.explained_variance_ratio_ = None
            self.stacked = None  # (n, d) fp64: PEFT's stacked matrix, kept while n < d (row Gram solve)
            self.scatter = None  # (d, d) fp32: its Gram matrix Xᵀ X, used instead while n >= d
            self.early_exit = None  # the step's _EarlyExit, when the forward may stop after the hooks
            self.replay = None  # the loop's _Replay (records the first pass's inputs when enabled)
            self.basis = None  # warm start for the next solve
            self.fresh = False  # data arrived since the last solve

        @torch.no_grad()
        def __call__(self, model, input, output):
            states = self.gather_layer_inputs(self.prepare_layer_inputs(input))
            if self.replay is not None:
                self.replay.record(self.name, states)
            self.consume(states)
            if self.early_exit is not None:
                self.early_exit.called(self.name)

        def consume(self, states: torch.Tensor) -> None:
            """What PEFT's ``SVDHook`` does with one input (a forward's or a replayed one)."""
            if states.size(0) < self.n_components:
                print(f"skipping SVD for {self.name} because there are less than {self.n_components} examples")
            else:
                if self.fresh:  # called twice in one forward: PEFT compares components after each call
                    solve([self])
                self.add(states.to(torch.float32))

        def add(self, X: torch.Tensor) -> None:
            """PEFT's ``IncrementalPCA.partial_fit`` up to its SVD: the matrix PEFT decomposes,
            ``X = [diag(S) Vt; batch − batch mean; mean correction]`` (``n x d``), kept in fp64 while
            ``n < d``, else its Gram matrix ``Xᵀ X`` (fp32)."""
            n_samples, n_features = X.shape  # PEFT's IncrementalPCA checks, same messages
            if self.n_components > n_features:
                raise ValueError(
                    f"n_components={self.n_components} invalid for n_features={n_features}, "
                    "need more rows than columns for IncrementalPCA processing."
                )
            first = self.n_features is None
            if first:
                self.n_features = n_features
                self.n_samples_seen_ = torch.tensor([0], device=X.device)
            elif n_features != self.n_features:
                raise ValueError(
                    "Number of features of the new batch does not match the number of features of the first batch."
                )
            ipca = importlib.import_module("peft.utils.incremental_pca").IncrementalPCA
            col_mean, col_var, n_total = ipca._incremental_mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
            if first or self.components_ is None:
                stacked = X.double() - col_mean.double()
            else:
                batch_mean = torch.mean(X, dim=0)
                factor = torch.sqrt((self.n_samples_seen_.double() / n_total) * n_samples)
                correction = factor * (self.mean_ - batch_mean)
                previous = self.singular_values_.double()[:, None] * self.components_.double()
                stacked = torch.cat([previous, (X - batch_mean).double(), correction.double()[None]])
            if stacked.shape[0] < n_features:  # the (n, n) row Gram matrix is the smaller problem
                self.stacked, self.scatter = stacked, None
            else:
                self.stacked, self.scatter = None, _scatter(stacked)
            self.n_samples_seen_ = n_total
            self.mean_, self.var_ = col_mean, col_var
            self.fresh = True

    _classes_cache["classes"] = (KeyHook, CovarianceHook)
    return KeyHook, CovarianceHook


class _EarlyExit:
    """Stops each of the loop's forwards once every hooked layer still collecting has had its input.

    PEFT discards the forward's output; only the hooks' inputs count. So with PEFT's default
    ``forward_fn`` (``model(**inputs)``, no other effect) and a model whose hooked layers each ran
    exactly once in the first forward, the rest of the forward (the later blocks, the LM head) is
    skipped. A layer that is not called in some forward just leaves that forward to run to its end."""

    def __init__(self):
        self.waiting: set = set()

    def arm(self, names) -> None:
        self.waiting = set(names)

    def called(self, name: str) -> None:
        if name in self.waiting:
            self.waiting.discard(name)
            if not self.waiting:
                raise StopForward

    def run(self, forward_fn, model, inputs) -> None:
        try:
            forward_fn(model, inputs)
        except StopForward:
            pass
        finally:
            self.waiting = set()


# Most bytes of layer inputs _Replay keeps (and at most a quarter of what the device can still give).
REPLAY_BYTES = 1 << 30


class _Replay:
    """The layer inputs of the loop's first pass over the dataloader, fed again to the hooks in
    later passes instead of running the forwards.

    PEFT cycles the dataloader with ``itertools.cycle``: from the second pass on the same batch
    objects come back in the same order, and the model (put in eval mode by the loop, its weights
    untouched, PEFT's default ``forward_fn`` and input preparation) gives every hooked layer the
    same input again. So the inputs each hook took at position ``p`` of the first pass are kept (a
    copy, up to :data:`REPLAY_BYTES`; beyond it the copies are dropped and every pass runs the
    forwards) and fed, in the order the forward called the hooks, at position ``p`` of later passes:
    the components are bit-equal to those of the forwards. A position where a layer now collecting
    had not been called in the first pass (it had converged, then its rank grew) runs the forward."""

    def __init__(self, enabled: bool = True):
        self.entries: list[list[tuple[str, torch.Tensor]]] = []  # by position in the first pass
        self.recording: Any = None  # the entry of the forward running in the first pass
        self.bytes = 0
        self.budget: Any = None
        self.enabled = enabled  # False: every pass runs the forwards (nothing recorded)

    def begin(self, position: int) -> None:
        """A forward starts: recorded when it is the first pass's (position ``len(entries)``)."""
        if self.enabled and position == len(self.entries):
            self.recording = []
            self.entries.append(self.recording)

    def end(self) -> None:
        self.recording = None

    def record(self, name: str, states: torch.Tensor) -> None:
        if self.recording is None:
            return
        if self.budget is None:
            self.budget = _replay_budget(states.device)
        size = states.numel() * states.element_size()
        if self.bytes + size > self.budget:
            logger.info(
                "EVA: the first pass's layer inputs exceed %.0f MiB; later passes run the forwards",
                self.budget / 2**20,
            )
            self.enabled, self.entries, self.recording, self.bytes = False, [], None, 0
            return
        self.recording.append((name, states.detach().clone()))
        self.bytes += size

    def feed(self, position: int, hooks: dict, active: list) -> bool:
        """Give the active hooks their inputs at ``position`` of the first pass; False (nothing fed)
        when that pass is not complete there or one of them was not called then."""
        if not self.enabled or position >= len(self.entries):
            return False
        entry = self.entries[position]
        if not set(active) <= {name for name, _ in entry}:
            return False
        wanted = set(active)
        for name, states in entry:
            if name in wanted:
                hooks[name][0].consume(states)
        return True


def _replay_budget(device: torch.device) -> int:
    """:data:`REPLAY_BYTES`, or a quarter of the memory the device can still give (CUDA: free
    memory; a CPU: ``MemAvailable``, which counts reclaimable page cache, else free pages)."""
    free = None
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        elif device.type == "cpu":
            free = _available_host_bytes()
    except (AttributeError, OSError, RuntimeError, ValueError):
        free = None
    return REPLAY_BYTES if free is None else min(REPLAY_BYTES, free // 4)


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _positions(dataloader):
    """``itertools.cycle(dataloader)`` with each batch's position in the first pass."""
    saved = []
    for item in dataloader:
        saved.append(item)
        yield len(saved) - 1, item
    while saved:
        yield from enumerate(saved)


def _input_key(x: torch.Tensor, hook) -> Any:
    """A key equal for equal inputs as PEFT's ``hash(tuple(x.view(-1).tolist()))`` sees them (values
    compared as Python numbers: dtype and shape ignored, ``-0.0 == 0.0``, NaN never equal)."""
    flat = x.detach().cpu().view(-1)  # PEFT's .view(-1): a non-contiguous input raises the same
    if flat.is_floating_point() and flat.numel() and bool(torch.isnan(flat.amax())):  # NaN propagates
        return ("nan", id(hook), len(hook.hashed_inputs))
    values = flat.to(torch.float64) + 0.0  # -0.0 + 0.0 == +0.0
    return hashlib.blake2b(values.numpy().tobytes(), digest_size=16).digest()


def _flip_signs(components: torch.Tensor) -> torch.Tensor:
    """PEFT's ``svd_flip(u_based_decision=False)`` on ``(..., k, d)`` rows: each row's
    largest-magnitude entry positive."""
    idx = components.abs().argmax(-1, keepdim=True)
    return components * torch.sign(components.gather(-1, idx))


@torch.no_grad()
def solve(hooks: list) -> None:
    """Recompute the components of every hook that received data since the last solve, batched by
    shape, and update their convergence flags as PEFT's ``SVDHook`` does."""
    rows: dict[tuple, list] = {}
    scatter: dict[tuple, list] = {}
    for hook in hooks:
        if not hook.fresh:
            continue
        if hook.stacked is not None:
            rows.setdefault((tuple(hook.stacked.shape), hook.stacked.device, hook.n_components), []).append(hook)
        else:
            warm = hook.basis is not None
            key = (hook.n_features, hook.scatter.device, hook.n_components, warm)
            scatter.setdefault(key, []).append(hook)
    for (_, _, k), members in rows.items():
        values, vectors, ok = _row_gram_top(torch.stack([h.stacked for h in members]), k)
        for i, hook in enumerate(members):
            if bool(ok[i]):
                _store(hook, values[i], vectors[i], None)
            else:  # a (nearly) rank-deficient stacked matrix: its d x d Gram matrix, solved exactly
                hook.scatter, hook.basis = _scatter(hook.stacked), None
                scatter.setdefault((hook.n_features, hook.scatter.device, k, False), []).append(hook)
    for (_, _, k, warm), members in scatter.items():
        C = torch.stack([h.scatter for h in members])
        start = torch.stack([h.basis for h in members]) if warm else None
        values, vectors, basis = top_eigenpairs(C, k, start)
        for i, hook in enumerate(members):
            _store(hook, values[i], vectors[i], basis[i])


def _scatter(stacked: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` (``d x d``, fp32, symmetric) of a stacked ``(n, d)`` matrix, on our covariance op."""
    d = stacked.shape[-1]
    C = torch.zeros(d, d, dtype=torch.float32, device=stacked.device)
    covariance_update(C, stacked.float(), check_finite=False)  # upper triangle
    return symmetrize_(C)


# The row Gram matrix X·Xᵀ is formed in fp64: its eigenvalues S² carry an error of about
# n·eps64·S₁², so a component is recovered as Xᵀu/S to better than fp32 while S² >= ROW_GRAM_FLOOR·S₁².
ROW_GRAM_FLOOR = 1e-8


def _row_gram_top(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` right singular pairs of each ``(m, n, d)`` fp64 ``X`` with ``n < d``, from the
    ``(n, n)`` Gram matrix ``X·Xᵀ = U S² Uᵀ`` and ``V = Xᵀ U S⁻¹``: ``S² (m, k)`` descending,
    ``V (m, d, k)`` and ``ok (m,)``, False where ``S_k²`` is below the floor (then ``V`` is not used)."""
    n = X.shape[-2]
    values, U = eigh_range(gram_lower(X, rows=True), n - k, k)
    values, U = values.flip(-1), U.flip(-1)
    ok = values[:, -1] >= ROW_GRAM_FLOOR * values[:, 0].clamp_min(torch.finfo(values.dtype).tiny)
    V = X.mT @ U
    V = V / V.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)
    return values, V, ok


def _store(hook, values: torch.Tensor, vectors: torch.Tensor, basis) -> None:
    """Set a hook's components from ``values (k,)`` (``S²``) and ``vectors (d, k)``, as PEFT's
    ``IncrementalPCA`` and ``SVDHook`` would (dtypes, sign rule, explained variance, convergence)."""
    previous = hook.components_
    # PEFT stacks its fp64 mean correction under fp32 rows from the second batch on: its
    # components are fp64 from then on
    dtype = torch.float32 if previous is None else torch.float64
    hook.components_ = _flip_signs(vectors.mT.contiguous()).to(dtype)
    hook.singular_values_ = values.clamp_min(0).sqrt().to(dtype)
    total = torch.sum(hook.var_ * hook.n_samples_seen_)
    hook.explained_variance_ratio_ = hook.singular_values_.square() / total
    hook.basis = basis
    hook.stacked = hook.scatter = None
    hook.fresh = False
    if previous is not None:
        current = hook.components_
        previous = previous.to(current.dtype)
        if len(current.shape) == 1:
            current, previous = current.reshape(1, -1), previous.reshape(1, -1)
        sim = torch.nn.functional.cosine_similarity(current, previous)
        hook.converged = sim >= hook.sim_thresh


def _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components):
    """PEFT's ``_get_rank_distribution``, on our hooks."""
    exp_vars = {k: h.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook_map.items() for c in exp_vars[name]])
    idx = torch.stack(values).argsort(descending=True)
    counts = {}
    for i in idx[:rank_budget].tolist():
        counts[keys[i]] = counts.get(keys[i], 0) + 1
    counts = {k: counts.get(k, 0) for k in layer_hook_map.keys()}
    for k, k_hook in equal_inputs_map.items():
        rank, rank_hook = counts[k], counts[k_hook]
        if rank_hook >= rank:
            continue
        counts[k_hook], counts[k] = rank, rank_hook
    return counts


def _refusal(gather_distributed_inputs: bool) -> str:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and gather_distributed_inputs:
        return "torch.distributed is initialized and gather_distributed_inputs=True (inputs gathered across ranks)"
    return ""


def wrap_get_eva_state_dict(original: Callable) -> Callable:
    """A replacement for ``peft.tuners.lora.eva._get_eva_state_dict`` (same signature)."""

    signature = inspect.signature(original)

    def _get_eva_state_dict(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # PEFT's own error for a wrong call
            return original(*args, **kwargs)
        bound.apply_defaults()
        args = tuple(bound.arguments.values())  # PEFT's nine, in order
        model, gather_distributed_inputs = args[0], args[7]
        reason = _refusal(gather_distributed_inputs)
        if reason:
            logger.info("EVA runs PEFT's own code: %s", reason)
            return original(*args)
        training = model.training
        try:
            return _eva_state_dict(*args)
        except Exception as exc:  # bad input raises PEFT's own error there; never fail where PEFT works
            _remove_hooks(model)
            model.train(training)
            logger.info("EVA runs PEFT's own code: our engine raised %s: %s", type(exc).__name__, exc)
            return original(*args)

    _get_eva_state_dict.__wrapped__ = original
    _get_eva_state_dict.__doc__ = original.__doc__
    return _get_eva_state_dict


def _remove_hooks(model) -> None:
    KeyHook, CovarianceHook = _hook_classes()
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, (KeyHook, CovarianceHook)):
                del module._forward_hooks[key]


@torch.no_grad()
def _eva_state_dict(
    model,
    dataloader,
    peft_config,
    target_module_check_fn,
    forward_fn,
    prepare_model_inputs_fn,
    prepare_layer_inputs_fn,
    gather_distributed_inputs,
    show_progress_bar,
) -> dict:
    """PEFT 0.21's ``_get_eva_state_dict`` step for step, with :class:`CovarianceHook` for ``SVDHook``."""
    eva = _eva()
    KeyHook, CovarianceHook = _hook_classes()
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")

    rho_threshold = 1000
    rho = peft_config.eva_config.rho
    if rho > rho_threshold:
        max_dim = max(max(p.shape) for p in model.parameters())
        rho = min(rho, max_dim // peft_config.r)

    training = model.training
    device = eva.get_device_with_meta_params(model)
    model.eval()

    inputs = next(iter(dataloader))
    if device is not None:
        inputs = eva.move_inputs_to_device(inputs, device)
    if prepare_model_inputs_fn is not None:
        model_inputs_for_hooks = prepare_model_inputs_fn(inputs, peft_config)
    else:
        model_inputs_for_hooks = deepcopy(inputs)

    # PEFT pops the per-layer functions it finds from the caller's mapping; we pop from a copy and
    # mirror that on the caller's mapping once we are done (a fallback then sees it untouched).
    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    hooks = {}
    max_components = {}
    rank_budget = 0
    for name, module in model.named_modules():
        if not target_module_check_fn(name, module):
            continue
        fn = layer_fns.pop(name, None) if layer_fns is not None else prepare_layer_inputs_fn
        hook = KeyHook(name=name, prepare_layer_inputs_fn=fn, gather_distributed_inputs=gather_distributed_inputs)
        hook.model_input = model_inputs_for_hooks
        hooks[name] = (hook, module.register_forward_hook(hook))
        pattern = peft_config.rank_pattern
        layer_rank = pattern.get(eva.get_pattern_key(pattern.keys(), name), peft_config.r)
        max_components[name] = round(layer_rank * rho)
        rank_budget += layer_rank
    if layer_fns is not None and len(layer_fns) > 0:
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not found in the model: "
            f"{layer_fns.keys()}"
        )

    forward_fn(model, inputs)
    once = all(len(h.hashed_inputs) == 1 for h, _ in hooks.values())
    early_exit = _EarlyExit() if once and forward_fn is eva.forward_fn_dict else None
    replay = _Replay(
        forward_fn is eva.forward_fn_dict
        and prepare_model_inputs_fn in (None, eva.prepare_model_inputs_fn_language_modeling)
        and prepare_layer_inputs_fn in (None, eva.prepare_layer_inputs_fn_language_modeling)
    )
    hash_dict = {k: h[0].hashed_inputs[0] for k, h in hooks.items()}
    equal_inputs = list(eva.find_equal_values(hash_dict).values())
    equal_inputs_map = {vv: v[0] for v in equal_inputs for vv in v[1:]}
    for names in equal_inputs:
        max_value = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = max_value

    for name in list(hooks.keys()):
        hook, handle = hooks.pop(name)
        handle.remove()
        if name in equal_inputs_map:
            continue
        hook = CovarianceHook(
            n_components=max_components[name],
            sim_thresh=peft_config.eva_config.tau,
            name=name,
            prepare_layer_inputs_fn=hook._prepare_layer_inputs_fn,
            gather_distributed_inputs=gather_distributed_inputs,
        )
        hook.early_exit, hook.replay = early_exit, replay
        handle = model.get_submodule(name).register_forward_hook(hook)
        hooks[name] = (hook, handle)
    layer_hook_map = {**dict(zip(hooks.keys(), hooks.keys())), **equal_inputs_map}

    dist = torch.distributed
    if show_progress_bar and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
        pbar = eva.tqdm(_positions(dataloader), position=0, leave=False)
        use_tqdm = True
    else:
        pbar = _positions(dataloader)
        use_tqdm = False
    convergence_dict = {k: False for k in hooks.keys()}
    rank_dist = max_components.copy()
    try:
        for position, inputs in pbar:
            if device is not None:
                inputs = eva.move_inputs_to_device(inputs, device)
            if prepare_model_inputs_fn is not None:
                model_inputs_for_hooks = prepare_model_inputs_fn(inputs, peft_config)
            else:
                model_inputs_for_hooks = deepcopy(inputs)

            for name in list(hooks.keys()):
                hook, handle = hooks[name]
                converged = torch.all(hook.converged[: rank_dist[name]])
                if (not convergence_dict[name]) and converged and handle:
                    handle.remove()
                    handle = None
                    convergence_dict[name] = True
                    continue
                elif convergence_dict[name] and not converged:
                    handle = model.get_submodule(name).register_forward_hook(hook)
                    convergence_dict[name] = False
                hook.model_input = model_inputs_for_hooks
                hooks[name] = (hook, handle)

            if use_tqdm:
                layer_converged = list(convergence_dict.values()) + [
                    convergence_dict[v] for v in equal_inputs_map.values()
                ]
                pbar.set_description(f"{sum(layer_converged)}/{len(layer_converged)} layers have converged")

            if all(convergence_dict.values()):
                break

            # (a converged layer keeps its removed handle in `hooks`, as in PEFT: the flag says)
            active = [name for name in hooks if not convergence_dict[name]]
            if not replay.feed(position, hooks, active):
                replay.begin(position)
                try:
                    if early_exit is not None:
                        early_exit.arm(active)
                        early_exit.run(forward_fn, model, inputs)
                    else:
                        forward_fn(model, inputs)
                finally:
                    replay.end()
            solve([h for h, _ in hooks.values()])

            if not all(h.components_ is not None for h, _ in hooks.values()):
                continue

            rank_dist = _rank_distribution(
                {k: h for k, (h, _) in hooks.items()}, layer_hook_map, equal_inputs_map, rank_budget, max_components
            )
    finally:
        if use_tqdm:
            pbar.close()

    remaining = {n for n, m in model.named_modules() for v in m._forward_hooks.values() if isinstance(v, eva._Hook)}
    if remaining:
        raise ValueError(f"Found active hooks added by EVA that weren't properly removed: {remaining}.")

    eva_state_dict = {}
    for name, rank in rank_dist.items():
        hook = hooks[layer_hook_map[name]][0]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
        u = hook.components_[:rank]
        if peft_config.eva_config.whiten:
            u /= hook.singular_values_[:rank].sqrt().reshape(-1, 1)  # in place, as PEFT (shared rows too)
        eva_state_dict[name] = u

    model.train(training)
    if device is not None:
        eva_state_dict = {k: v.to(device) for k, v in eva_state_dict.items()}
    if isinstance(prepare_layer_inputs_fn, Mapping) and hasattr(prepare_layer_inputs_fn, "pop"):
        for name in list(prepare_layer_inputs_fn):
            if name in max_components:
                prepare_layer_inputs_fn.pop(name)
    return eva_state_dict
