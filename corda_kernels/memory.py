"""Peak memory of a calibrate -> decompose -> adapt run, estimated before running it.

``estimate_memory(model, batch_size=, seq_len=, n_batches=, ...)`` returns a :class:`MemoryEstimate`:
for each phase of the run, the bytes each item holds and where (the model's device, or ``"cpu"``
for what is offloaded), and the peak. The model may live on the ``meta`` device (built from its
config, no weights loaded: :func:`meta_model`); pass ``device=`` for where the run would happen.

What is counted (all from shapes and dtypes; no calibration is run):

- weights: the model's parameters and buffers.
- covariances: one fp32 ``(d, d)`` accumulator per distinct target input (layers given the same
  tensor share one, as in calibration: q/k/v, gate/up; found by a 2-token forward, on the meta
  device when the model is there); kept after calibration in the chosen ``storage`` on ``covariance_device``.
  Whole-model: every group at once. Block-wise: one block's.
- activations: one block's forward on one batch (calibration stops after the last target, so no
  logits): ``tokens · dtype · (Σ out_features of the block's targets + 2 · hidden)``, the attention
  mask (and scores for eager attention), and the covariance update's temporaries (an fp32 copy of
  the selected rows, the NaN check's ``|x|``, a ``(d, 256)`` block).
- block inputs (block-wise): every batch's input to the current block (its hidden states
  and attention mask); the hidden states twice while a block runs (inputs and outputs).
- decomposition: the largest chunk's working set as :mod:`corda_kernels.decomposition.plan` sizes it
  (``bytes_per_layer`` per layer, at most ``max_batch_bytes`` per chunk, plus ``bytes_per_chunk``).
- residual copies + adapters: the new residual weight of every swapped layer (``quantize``: its
  NF4 / int8 codes and statistics, plus one layer's full-precision residual and quantization
  temporaries; ``quantize_iters``: one layer's fp64 refinement temporaries), its factors and one
  layer's fp32 temporaries; ``apply`` holds the old weights until it returns. Block-wise keeps the
  replaced layers (on the CPU) to restore the model if a later block fails: "undo copies" (parked
  where they live, only the weights the swap replaced by new tensors: none for LoRA's Linear layers)
  (``undo="reconstruct"``: only what rebuilds them bit for bit, counted at
  :data:`RECONSTRUCT_BYTES_PER_WEIGHT`; measured 0.13-0.44).
- Partial-LoRA's ratio derivation (without ``densities=``; before anything else, on the whole
  model): ``score="svd"``, one layer at a time its weight copied and fully decomposed (fp32
  SVD and the rank-k product: :func:`_svd_words`), and a no-grad forward on the largest few-shot
  batch (one block's activations and the logits); ``score="snip"``, every target's gradient, then
  the larger of the backward's saved activations (every block, the logits) and the largest
  layer's scores (:data:`_SNIP_BYTES_PER_WEIGHT`). A further adapter derives them on the rebuilt
  original weights. Methods that do not subtract (LoRA, Partial-LoRA) keep the weight itself:
  no residual copy (Conv1D weights are copied, stored transposed).
- a further adapter (``adapter_name=`` on a model that carries adapters, as ``apply`` adds it):
  the loaded adapters (the model's factors, apart from its weights); the initial factors ``A0``,
  ``B0`` read from ``initial=`` for layers whose base is their first adapter's residual, and those
  layers' original weights rebuilt as ``W' + s·B0·A0`` while the new adapter is calibrated and
  decomposed (whole-model: all at once; block-wise: one block's); the new adapter's factors, its
  own ``A0``, ``B0`` when subtractive, and one layer's fp32 temporaries. No residual is formed;
  block-wise undo keeps each converted layer's residual (``undo="cpu"``) or what rebuilds it.

Measured against peak RSS on CPU (tests/test_memory.py, bench/results/blockwise.md). Not counted:
allocator slack (glibc may keep freed blocks: RSS above live bytes, by 20-46% in block-wise
runs with the default malloc settings), the Python/torch runtime, tokenizers and data.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from . import adapt as _adapt
from ._deprecation import renamed
from .calibration.recorder import CovarianceRecorder
from .calibration.storage import check_options, packed_size
from .config import AdaptConfig
from .decomposition import plan
from .decomposition.refinement import make_quantization
from .integrations import hf
from .methods import InitMethod
from .methods.lora import LoRA
from .methods.partial_lora import PartialLoRA
from .methods.svd_init import PiSSA
from .nn import LowRankLinear
from .nn.lowrank_linear import adapter_dtype

MiB = 2**20
# What apply_blockwise(undo="reconstruct") keeps per target weight (blockwise._Rebuild): a bit mask (1/8
# byte) and an int8 per entry that W' + s·B·A misses; measured 0.13 (LoRA-style) to 0.44 (PiSSA, bf16).
RECONSTRUCT_BYTES_PER_WEIGHT = 0.5
_BLOCKWISE = ("capture", "run block", "decompose block", "swap block")


@dataclass
class MemoryEstimate:
    """The itemized peak memory of a run, per phase and device: what :func:`estimate_memory` returns.

    ``summary()`` prints it as a table (items x phases, MiB); ``peak_bytes(where)`` is the largest
    phase total on a device, ``extra_bytes(where)`` the same above the loaded model.

    Attributes:
        phases: phase -> ``{(item, where): bytes}``, ``where`` a device string (``"cpu"``,
            ``"cuda:0"``). Whole-model phases: calibrate, decompose, swap; block-wise: capture,
            run block, decompose block, swap block; both first "derive ratios" when Partial-LoRA
            derives its ratios on few-shot batches.
        device: where the run computes.
        title: one line describing the run.
        notes: caveats printed under the table.
    """

    phases: dict[str, dict[tuple[str, str], int]]
    device: str
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def total(self, phase: str, where: Optional[str] = None, *, exclude: tuple = ()) -> int:
        where = where or self.device
        return sum(b for (item, w), b in self.phases[phase].items() if w == where and item not in exclude)

    def peak_phase(self, where: Optional[str] = None) -> str:
        return max(self.phases, key=lambda phase: self.total(phase, where))

    def peak_bytes(self, where: Optional[str] = None) -> int:
        """The largest total of any phase on ``where`` (default: the compute device)."""
        return max(self.total(phase, where) for phase in self.phases)

    def extra_bytes(self, where: Optional[str] = None) -> int:
        """Peak above the loaded model (every item but the weights and the runtime) on ``where``."""
        return max(self.total(phase, where, exclude=_LOADED) for phase in self.phases)

    def add(self, item: str, where: str, nbytes: int) -> None:
        """Count ``nbytes`` of ``item`` on ``where`` in every phase (what a caller holds throughout,
        e.g. the command line's runtime and output check)."""
        for phase in self.phases.values():
            phase[(item, where)] = phase.get((item, where), 0) + int(nbytes)

    @property
    def locations(self) -> list[str]:
        found = {w for items in self.phases.values() for (_, w) in items}
        return sorted(found, key=lambda w: (w != self.device, w))

    def summary(self) -> str:
        """A printable table: items x phases in MiB, totals and the peak per location."""
        rows = sorted(
            {key for items in self.phases.values() for key in items},
            key=lambda k: (self.locations.index(k[1]), _ORDER.index(k[0]) if k[0] in _ORDER else 99),
        )
        names = list(self.phases)
        width = max(12, *(len(n) for n in names))
        lines = [self.title, "", f"{'MiB':<28}{'where':<8}" + "".join(f"{n:>{width + 2}}" for n in names)]
        for item, where in rows:
            cells = "".join(f"{self.phases[n].get((item, where), 0) / MiB:>{width + 2},.1f}" for n in names)
            lines.append(f"{item:<28}{where:<8}" + cells)
        for where in self.locations:
            cells = "".join(f"{self.total(n, where) / MiB:>{width + 2},.1f}" for n in names)
            lines.append(f"{'total':<28}{where:<8}" + cells)
        lines.append("")
        for where in self.locations:
            lines.append(
                f"peak on {where}: {self.peak_bytes(where) / MiB:,.1f} MiB in '{self.peak_phase(where)}' "
                f"({self.extra_bytes(where) / MiB:,.1f} MiB above the loaded model)"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


_ORDER = [
    "runtime + tokenizer",
    "weights",
    "loaded adapters",
    "covariances",
    "activations",
    "block inputs",
    "initial factors",
    "original weights",
    "decomposition",
    "residual copies + adapters",
    "new adapter",
    "undo copies",
]
_LOADED = ("weights", "loaded adapters", "runtime + tokenizer")  # the model as loaded, and the process


def meta_model(model: Optional[str], gguf_file: Optional[str] = None, dtype: str = "fp32") -> nn.Module:
    """A Hugging Face causal LM built from its config on the ``meta`` device (no weights read):
    a hub id / path, or the embedded SmolLM2 default when ``model`` is None."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .integrations import loading

    if model is None:
        model, gguf_file = loading.default_model_location()
    config = AutoConfig.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=loading.DTYPES[dtype]).eval()


def input_groups(model: nn.Module, targets: Mapping[str, nn.Module]) -> Optional[dict[str, str]]:
    """layer -> group (the first layer given the same input tensor), from calibration's own 2-token
    probe (it runs on a ``meta``-device model), or None when the model cannot run one."""
    recorder = CovarianceRecorder(targets)
    probe = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=hf.input_device(model))}
    try:
        with recorder:
            recorder.probe(model, probe)
    except Exception:
        return None
    return {name: recorder.groups.get(name, name) for name in targets}


def _block_of(name: str, stacks: list[str]) -> str:
    for stack in stacks:
        if name.startswith(stack + "."):
            return stack + "." + name[len(stack) + 1 :].split(".", 1)[0]
    return "(outside the blocks)"


class _Layers:
    """Shapes of the targets, their groups and blocks."""

    def __init__(self, model, targets, groups, ranks, dora: bool = False):
        self.shape = {n: hf.in_out_features(m) for n, m in targets.items()}  # (in, out)
        self.weight_size = {n: hf.weight_matrix(m).element_size() for n, m in targets.items()}
        self.transposed = {n: hf.is_conv1d(m) for n, m in targets.items()}  # (in, out) storage: copied when built
        self.groups, self.ranks, self.dora = groups, ranks, dora
        stacks = [name for name, _ in hf.block_stacks(model)]
        self.blocks: dict[str, list[str]] = defaultdict(list)
        for name in targets:
            self.blocks[_block_of(name, stacks)].append(name)

    def cov_dims(self, names) -> list[int]:
        """``d`` of each distinct covariance of ``names``."""
        return [self.shape[n][0] for n in {self.groups[n]: n for n in names}.values()]

    def target_bytes(self, names) -> int:
        return sum(self.shape[n][0] * self.shape[n][1] * self.weight_size[n] for n in names)

    def copied(self, names, subtracts: bool) -> list:
        """The layers whose frozen weight becomes a new tensor when built: every one for a method
        that subtracts its update (the residual), else only weights stored transposed (Conv1D)."""
        return [n for n in names if subtracts or self.transposed[n]]

    def swap_bytes(self, names, quantization=None, subtracts: bool = True) -> int:
        """New residuals (full precision, or quantized; a method that does not subtract keeps the
        weight itself), factors (weight dtype and fp32; with DoRA the fp32 magnitude and cached
        ``‖W_o‖²`` per output row) and one layer's build temporaries (fp32; with quantization also
        its full-precision residual and bitsandbytes' copy, and the fp64 refinement's matrices)."""
        factors = sum(self.ranks[n] * sum(self.shape[n]) * (self.weight_size[n] + 4) for n in names)
        if self.dora:
            factors += sum(2 * 4 * self.shape[n][1] for n in names)
        sizes = [self.shape[n][0] * self.shape[n][1] for n in names]
        per_weight = 2 * 4
        if quantization is not None:
            residuals = sum(quantized_bytes(self.shape[n][1], self.shape[n][0], quantization.fmt) for n in names)
            per_weight += max(self.weight_size[n] for n in names) + 4 + (6 * 8 if quantization.iters else 0)
        else:
            residuals = self.target_bytes(self.copied(names, subtracts))
        return residuals + factors + max(sizes, default=0) * per_weight

    def add_bytes(self, names, further: _Further) -> int:
        """A further adapter on ``names``: its factors (as decomposed, and as stored), its own
        initial factors when subtractive (stored as the trainable ones), and one converted layer's
        fp32 temporaries (``use_original_base``: the weight and ``s·B0·A0``)."""
        per_rank = sum(self.ranks[n] * sum(self.shape[n]) for n in names)
        factors = sum(self.ranks[n] * sum(self.shape[n]) * (self.weight_size[n] + 4) for n in names)
        initial = per_rank * further.train_size if further.subtract else 0
        converted = [self.shape[n][0] * self.shape[n][1] for n in names if n in further.converted]
        return factors + initial + max(converted, default=0) * 2 * 4

    def original_bytes(self, names, further: Optional[_Further]) -> int:
        """The original weights rebuilt (``W' + s·B0·A0``) for the converted layers of ``names``."""
        return 0 if further is None else self.target_bytes(n for n in names if n in further.converted)


class _Further(NamedTuple):
    """A further adapter's run: the layers whose residual base is converted back to the original,
    the bytes of their initial factors, whether the new adapter is subtractive, and the bytes per
    element of its trainable factors."""

    converted: frozenset
    start_bytes: int
    subtract: bool
    train_size: int


def quantized_bytes(out_f: int, in_f: int, fmt: str) -> int:
    """Bytes of a :class:`~corda_kernels.ops.quantized.QuantizedWeight` ``(out_f, in_f)``: NF4 packed codes
    (half a byte per weight), a uint8 absmax per 64 and fp32 ones per 256 of those, the code tables;
    int8 one byte per weight and an fp32 scale per row."""
    n = out_f * in_f
    if fmt == "int8":
        return n + 4 * out_f
    return n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 4 + 4 * (16 + 256)


class _Workload(NamedTuple):
    """The calibration forwards' sizes: ``tokens`` per batch, ``act`` bytes per activation element,
    the attention ``mask`` and ``attention`` bytes (mask plus eager scores) of one batch."""

    n_batches: int
    tokens: int
    act: int
    mask: int
    attention: int


def _forward_bytes(layers: _Layers, names, work: _Workload) -> int:
    """One block's transient forward memory on one batch (its targets' outputs, the hidden state
    in and out, the attention mask and scores); also what autograd keeps of the block."""
    outputs = sum(layers.shape[n][1] for n in names)
    hidden = layers.shape[names[0]][0]
    return work.tokens * work.act * (outputs + 2 * hidden) + work.attention


def _activations(layers: _Layers, names, work: _Workload) -> int:
    """One block's transient forward memory on one batch plus the covariance update's temporaries."""
    widest = max(layers.shape[n][0] for n in names)
    update = work.tokens * widest * (work.act + 4) + widest * 256 * 4
    return _forward_bytes(layers, names, work) + update


def _workload(model, n_batches: int, batch_size: int, seq_len: int, act: int) -> _Workload:
    """The sizes of ``n_batches`` forwards of ``batch_size x seq_len`` tokens."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 0) or 0
    eager = getattr(config, "_attn_implementation", None) == "eager"
    mask = batch_size * seq_len**2 * (act if eager else 1)  # (B, 1, S, S); eager attention adds its scores
    attention = mask + (2 * batch_size * heads * seq_len**2 * act if eager else 0)
    return _Workload(n_batches, batch_size * seq_len, act, mask, attention)


# Peak fp32 words of one torch.linalg.svd(W (m x n), full_matrices=False) and the rank-k product
# Partial-LoRA's search forms from it: 2·m·n + (m + n)·k + 2·k², k = min(m, n) (measured on CPU at
# 2048x1024, 1024x2048, 1024² and 3000x500: 0.89-1.06x of this).
def _svd_words(m: int, n: int) -> int:
    k = min(m, n)
    return 2 * m * n + (m + n) * k + 2 * k * k


# Bytes per weight of SNIP's scores on the largest layer (partial_lora_ratios.mass_fraction):
# |W ⊙ ∂L/∂W| in fp32, its fp64 copy, the sort's values and int64 indices, the cumulative sum.
_SNIP_BYTES_PER_WEIGHT = 4 + 8 + 8 + 8 + 8


def _logit_width(model: nn.Module) -> int:
    """The LM head's output width (the vocabulary), 0 for a model without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def _derivation(method: InitMethod, model: nn.Module, layers: _Layers, names, act: int) -> Optional[dict]:
    """What Partial-LoRA's ratio derivation (``prepare``, run on the few-shot batches before any
    decomposition) holds, item -> bytes; None when the method derives nothing (given densities).
    ``score="svd"``: one layer at a time, its weight copied and fully decomposed, and a no-grad
    forward (one block's activations and the logits); ``score="snip"``: every target's gradient,
    then the larger of a backward's saved activations (every block, the logits) and the scores of
    the largest layer."""
    if not isinstance(method, PartialLoRA) or method.densities is not None:
        return None
    shapes = [tuple(batch["input_ids"].shape) for batch in method.few_shot]
    shape = max(shapes, key=lambda s: s[0] * s[-1] if len(s) > 1 else s[0])
    batch_size, seq_len = (shape[0], shape[-1]) if len(shape) > 1 else (1, shape[0])
    work = _workload(model, 1, batch_size, seq_len, act)
    head = _logit_width(model)
    logits = work.tokens * head * (act + 4 + 4)  # the logits, their fp32 copy, the loss's softmax
    blocks = [[n for n in block if n in names] for block in layers.blocks.values()]
    blocks = [b for b in blocks if b]
    sizes = {n: layers.shape[n][0] * layers.shape[n][1] for n in names}
    if method.score == "svd":
        search = max(layers.target_bytes([n]) + 4 * _svd_words(layers.shape[n][1], layers.shape[n][0]) for n in names)
        forward = max((_forward_bytes(layers, b, work) for b in blocks), default=0) + logits
        return {"ratio search": search, "activations": forward}
    saved = sum(_forward_bytes(layers, b, work) for b in blocks) + logits
    scores = _SNIP_BYTES_PER_WEIGHT * max(sizes.values())
    return {"gradients": layers.target_bytes(names), "ratio search": max(saved, scores)}


def _words_per_weight(method: InitMethod) -> Optional[int]:
    """fp32 words per weight of a decomposition chunk for methods without a full SVD (None: the
    plan's :func:`~corda_kernels.decomposition.plan.bytes_per_layer`): LoRA, its subclasses and
    Partial-LoRA draw their factors (the stacked fp32 weights only); PiSSA's randomized SVD works on sketches
    (the stacked weights, the squared-norms temporary, the sketch products: 3, measured 2.9)."""
    if isinstance(method, (LoRA, PartialLoRA)):
        return 1
    if isinstance(method, PiSSA) and method.svd == "randomized":
        return 3
    return None


def _working_set(layers: _Layers, names, needs_cov: bool, budget: Optional[int], words: Optional[int] = None) -> int:
    """The largest decomposition chunk over ``names``' buckets (same shape and rank), chunked as the
    engine chunks them; ``words``: per weight, as :func:`_words_per_weight` gives them."""
    buckets: dict[tuple, int] = defaultdict(int)
    for n in names:
        buckets[(layers.shape[n], layers.ranks[n])] += 1
    largest = 0
    for ((in_f, out_f), _), count in buckets.items():
        per_layer = 4 * words * out_f * in_f if words else plan.bytes_per_layer(out_f, in_f, needs_cov)
        per_chunk = plan.bytes_per_chunk(out_f, in_f, needs_cov)
        chunk = count if budget is None else plan.chunk_layers(out_f, in_f, needs_cov, budget)
        largest = max(largest, min(count, chunk) * per_layer + per_chunk)
    return largest


def estimate_memory(
    model: nn.Module,
    config: Union[AdaptConfig, str, InitMethod] = "corda",
    *,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    blockwise: bool = False,
    covariance_device: Optional[str] = None,
    block_inputs_device: Optional[str] = None,
    storage: str = "full",
    undo: str = "cpu",
    device=None,
    offload: Optional[str] = None,
    adapter_name: Optional[str] = None,
    initial: Optional[str] = None,
    **options,
) -> MemoryEstimate:
    """Estimate the peak memory of calibrating and adapting ``model``, before running it.

    Counted from shapes and dtypes (no calibration is run): weights, covariances (deduplicated as
    calibration shares them, found by a 2-token forward that also works on a ``meta``-device
    model), activations of one block's forward, the block-wise hidden-state cache, decomposition
    chunks, residual copies and adapters (see :mod:`corda_kernels.memory`). Not counted: allocator
    slack, the Python/torch runtime, tokenizers and data.

    Args:
        model: the model as it will be run (its weights may be on the ``meta`` device).
        config: the :class:`~corda_kernels.AdaptConfig` (or method) the run will use, as for
            :func:`corda_kernels.apply`: its method, rank / rank pattern, targets, quantization and
            ``max_batch_bytes`` decide the memory.
        batch_size: calibration texts per batch.
        seq_len: the padded sequence length (an upper bound when texts are shorter).
        n_batches: calibration batches (block-wise: all are cached).
        blockwise: estimate :func:`corda_kernels.apply_blockwise` instead of ``calibrate`` + ``apply``.
        covariance_device: ``"cpu"``: whole-model, where the finalized covariances are kept
            (``calibrate(covariance_device=)``).
        block_inputs_device: ``"cpu"``: block-wise, where the cached block inputs are kept
            (``apply_blockwise(block_inputs_device=)``).
        storage: ``"full"`` or ``"packed"`` finalized covariances (whole-model; ``calibrate(storage=)``).
        undo: block-wise, ``apply_blockwise(undo=)``: ``"cpu"`` counts the parked originals,
            ``"reconstruct"`` the correction that rebuilds them (:data:`RECONSTRUCT_BYTES_PER_WEIGHT`).
        device: where the run computes (default: the model's input device; ``meta`` counts as CPU).
        offload: deprecated: ``covariance_device`` (whole-model) or ``block_inputs_device`` (block-wise).
        adapter_name: as for :func:`corda_kernels.apply`: on a model that already carries
            corda_kernels adapters, estimate adding this further adapter (checked as ``apply``
            checks it): the loaded adapters, the initial factors and rebuilt original weights of
            layers whose base is a residual, the new adapter's factors. The covariances are those
            calibrated on the base model.
        initial: as for :func:`corda_kernels.apply`, with ``adapter_name``: the directory of the
            first adapter's initial factors (read: their sizes are counted).
        **options: :class:`~corda_kernels.AdaptConfig` fields and the method's own options, as for
            :func:`corda_kernels.apply`.

    Returns:
        A :class:`MemoryEstimate`; ``print(estimate.summary())`` shows it.

    Raises:
        ValueError: ``batch_size``, ``seq_len`` or ``n_batches`` is not a positive int;
            ``storage`` or ``covariance_device`` is not a known value; an unknown method;
            ``target_modules`` matches nothing; a further adapter :func:`corda_kernels.apply`
            would refuse (the message names ``estimate_memory(adapter_name=...)`` and the layer).
        TypeError: an unknown method option; a further adapter of mixed dtypes.
    """
    if blockwise:
        block_inputs_device = renamed("estimate_memory", "offload", offload, "block_inputs_device", block_inputs_device)
    else:
        covariance_device = renamed("estimate_memory", "offload", offload, "covariance_device", covariance_device)
    check_options(storage, covariance_device)
    for label, value in (("batch_size", batch_size), ("seq_len", seq_len), ("n_batches", n_batches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"estimate_memory: {label} must be a positive integer, got {value!r}")
    config = AdaptConfig.build(config, where="estimate_memory", **options)
    method = config.make_method()
    quantization = make_quantization(config.quantize, config.quantize_iters)
    if blockwise and quantization is not None and undo == "reconstruct":
        raise ValueError(
            "estimate_memory: apply_blockwise refuses undo='reconstruct' with quantize (a quantized residual "
            "cannot give the original weights back); estimate undo='cpu'"
        )
    further = None
    if _adapt.adds_further(model, adapter_name, initial, "estimate_memory"):
        adding = _adapt.plan_further(
            model, adapter_name, config, initial, f"estimate_memory(adapter_name={adapter_name!r})"
        )
        targets, ranks = adding.layers, adding.targets.ranks
        dtype = next(iter(targets.values())).weight.dtype
        further = _Further(
            frozenset(adding.starts),
            sum(t.numel() * t.element_size() for pair in adding.starts.values() for t in pair),
            method.subtracts,
            adapter_dtype(dtype, config.autocast_adapter_dtype).itemsize,
        )
    else:
        targets = hf.find_targets(model, config.target_modules, config.exclude_modules)
        ranks = {n: hf.pattern_entry(config.rank_pattern, n, config.rank)[1] for n in targets}
    home = torch.device(device) if device is not None else hf.input_device(model)
    home = "cpu" if home.type == "meta" else str(home)
    notes = []

    adapters = {  # the loaded adapters' tensors: every one of the adapted layers' but their weight and bias
        id(t)
        for m in model.modules()
        if isinstance(m, LowRankLinear)
        for name, t in [*m.named_parameters(), *m.named_buffers()]
        if name not in ("weight", "bias")
    }
    weights: dict[tuple[str, str], int] = defaultdict(int)
    for tensor in list(model.parameters()) + list(model.buffers()):
        where = home if tensor.device.type == "meta" else str(tensor.device)
        item = "loaded adapters" if id(tensor) in adapters else "weights"
        weights[(item, where)] += tensor.numel() * tensor.element_size()
    floating = [p for p in model.parameters() if p.is_floating_point()]
    act = floating[0].element_size() if floating else 4

    groups = input_groups(model, targets)
    if groups is None:
        groups = {n: n for n in targets}
        notes.append("a 2-token forward failed, so no shared inputs were assumed: covariances are an upper bound")
    layers = _Layers(model, targets, groups, ranks, dora=config.dora)

    work = _workload(model, n_batches, batch_size, seq_len, act)

    budget = config.max_batch_bytes
    if budget is None and home == "cpu":
        budget = plan.CPU_BYTES
    elif budget is None and torch.cuda.is_available():
        budget = plan.budget(torch.device(home), None)
    elif budget is None:
        notes.append(f"no CUDA here to read {home}'s free memory: decomposition chunks assumed unbounded")

    needs_cov = method.needs_covariance
    words = _words_per_weight(method)
    base = dict(weights)
    if further is not None:  # read from initial= and held until the run ends
        base[("initial factors", home)] = further.start_bytes
    names = list(targets)
    stored = covariance_device if (covariance_device and not blockwise) else home
    cov_full = sum(4 * d * d for d in layers.cov_dims(names))
    cov_kept = sum(4 * (packed_size(d) if storage == "packed" else d * d) for d in layers.cov_dims(names))
    mode = "block-wise (apply_blockwise)" if blockwise else "whole-model (calibrate + apply)"
    if further is not None:
        mode += f", adding adapter {adapter_name!r}"
    title = (
        f"Memory estimate: {type(model).__name__}, {method.describe()} rank {config.rank}, {mode}, {len(names)} "
        f"target layers, {n_batches} batches x {batch_size} x {seq_len} tokens, on {home}"
        + (f", {quantization.fmt} residuals" if quantization is not None else "")
    )
    if blockwise:
        inputs_at = block_inputs_device or home
        phases = _blockwise_phases(
            layers, base, home, inputs_at, undo, quantization, work, needs_cov, budget, further, words, method.subtracts
        )
    else:
        block_acts = [_activations(layers, b, work) for b in layers.blocks.values()]
        phases = {
            "calibrate": {**base, ("covariances", home): cov_full, ("activations", home): max(block_acts)},
            "decompose": {
                **base,
                ("covariances", stored): cov_kept,
                ("original weights", home): layers.original_bytes(names, further),
                ("decomposition", home): _working_set(layers, names, needs_cov, budget, words),
            },
            "swap": {
                **base,
                ("covariances", stored): cov_kept,
                **(
                    {("residual copies + adapters", home): layers.swap_bytes(names, quantization, method.subtracts)}
                    if further is None
                    else {("new adapter", home): layers.add_bytes(names, further)}
                ),
            },
        }
        if not needs_cov:
            del phases["calibrate"]
            for phase in phases.values():
                phase.pop(("covariances", stored))
    derivation = _derivation(method, model, layers, names, act)
    if derivation is not None:  # Partial-LoRA's prepare: before anything else, on the whole model
        derive = {**base, ("original weights", home): layers.original_bytes(names, further)}
        derive.update({(item, home): nbytes for item, nbytes in derivation.items()})
        phases = {"derive ratios": derive, **phases}
    for phase in phases.values():
        for key in [k for k, v in phase.items() if v == 0 and k[0] != "weights"]:
            del phase[key]
    return MemoryEstimate(phases, home, title, notes)


def _blockwise_phases(
    layers: _Layers, base, home, inputs_at, undo_mode, quantization, work, needs_cov, budget, further, words, subtracts
):
    """Per phase, the worst block (the replaced layers of earlier blocks accumulate as undo copies;
    a further adapter's: the residuals of its converted layers)."""
    n_batches = work.n_batches
    hidden = layers.shape[next(iter(layers.shape))][0]
    per_batch_hidden = work.tokens * hidden * work.act
    inputs = n_batches * (per_batch_hidden + work.mask)
    phases = {
        "capture": {
            **base,
            ("block inputs", inputs_at): inputs,
            ("activations", home): 2 * per_batch_hidden + work.attention,
        }
    }
    undo_at = "cpu"
    undo = 0
    for phase in _BLOCKWISE[1:]:
        phases[phase] = dict(base)
    for names in layers.blocks.values():
        covs = sum(4 * d * d for d in layers.cov_dims(names))
        candidates = {
            "run block": {
                ("undo copies", undo_at): undo,
                ("block inputs", inputs_at): inputs + n_batches * per_batch_hidden,
                ("covariances", home): covs,
                ("original weights", home): layers.original_bytes(names, further),
                ("activations", home): _activations(layers, names, work),
            },
            "decompose block": {
                ("undo copies", undo_at): undo,
                ("block inputs", inputs_at): inputs,
                ("covariances", home): covs,
                ("original weights", home): layers.original_bytes(names, further),
                ("decomposition", home): _working_set(layers, names, needs_cov, budget, words),
            },
        }
        if further is not None:
            kept = [n for n in names if n in further.converted]
        elif undo_at == home:  # parked where they live: only weights the swap replaced by new tensors count
            kept = layers.copied(names, subtracts)
        else:
            kept = names
        copies = layers.target_bytes(kept)  # further, reconstruct: copied while the block is added
        if undo_mode == "cpu":
            undo += copies
        else:
            undo += int(RECONSTRUCT_BYTES_PER_WEIGHT * sum(layers.shape[n][0] * layers.shape[n][1] for n in kept))
        if further is None:  # the residuals replace the old weights (quantized ones are smaller: never below 0)
            replaced = names if quantization is not None else layers.copied(names, subtracts)
            swap_new = {
                ("residual copies + adapters", home): max(
                    0, layers.swap_bytes(names, quantization, subtracts) - layers.target_bytes(replaced)
                )
            }
        else:
            swap_new = {("new adapter", home): layers.add_bytes(names, further)}
        transient = copies if further is not None and undo_mode != "cpu" else 0
        candidates["swap block"] = {
            ("undo copies", undo_at): undo + transient,
            ("block inputs", inputs_at): inputs,
            **swap_new,
        }
        for phase, items in candidates.items():
            if sum(items.values()) >= sum(v for k, v in phases[phase].items() if k not in base):
                phases[phase] = {**base, **items}
    return phases
