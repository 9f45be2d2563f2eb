"""How many parameters an adapted model trains, per layer, against dense LoRA at the same rank.

Dense LoRA of rank ``r`` on an ``(out, in)`` layer trains ``r·(out + in)``; asymmetric LoRA trains
``out·r``, SiVA ``k``, Partial-LoRA ``kept_rows·r + r·kept_cols``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import LowRankLinear


@dataclass
class LayerParameters:
    trainable: int  # adapter numbers with requires_grad
    dense_lora: int  # r·(out + in)
    rank: int
    shape: tuple[int, int]  # (out, in)


@dataclass
class ParameterReport:
    layers: dict[str, LayerParameters]
    other_trainable: int  # trainable parameters outside the adapters (e.g. a classifier head)

    @property
    def trainable(self) -> int:
        return sum(layer.trainable for layer in self.layers.values())

    @property
    def dense_lora(self) -> int:
        return sum(layer.dense_lora for layer in self.layers.values())

    @property
    def fraction(self) -> float:
        """Adapter parameters trained as a fraction of dense LoRA's."""
        return self.trainable / self.dense_lora

    def table(self) -> str:
        lines = [f"{'layer':<48} {'shape':>11} {'rank':>5} {'trainable':>10} {'dense LoRA':>10} {'ratio':>6}"]
        for name, p in self.layers.items():
            shape = f"{p.shape[0]}x{p.shape[1]}"
            ratio = p.trainable / p.dense_lora
            lines.append(f"{name:<48} {shape:>11} {p.rank:>5} {p.trainable:>10} {p.dense_lora:>10} {ratio:>6.3f}")
        lines.append(f"{'total':<48} {'':>11} {'':>5} {self.trainable:>10} {self.dense_lora:>10} {self.fraction:>6.3f}")
        if self.other_trainable:
            lines.append(f"other trainable parameters: {self.other_trainable}")
        return "\n".join(lines)


def trainable_parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable adapter parameters of every ``LowRankLinear`` in ``model`` vs dense LoRA.

    Dense LoRA of rank ``r`` on an ``(out, in)`` layer trains ``r·(out + in)``; asymmetric LoRA
    trains ``out·r``, SiVA ``k``, Partial-LoRA ``kept_rows·r + r·kept_cols``.

    Args:
        model: an adapted model (trainable parameters outside its ``LowRankLinear`` layers are
            counted in ``other_trainable``).

    Returns:
        A ``ParameterReport``: ``layers`` (name -> trainable count, dense-LoRA count, rank, shape),
        the totals ``trainable`` / ``dense_lora`` / ``fraction``, ``other_trainable`` (trainable
        parameters outside the adapters) and ``table()``, a printable per-layer table.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer.
    """
    layers, seen = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        params = [p for p in module.parameters() if p.requires_grad]
        seen.update(id(p) for p in params)
        layers[name] = LayerParameters(
            trainable=sum(p.numel() for p in params),
            dense_lora=module.rank * (module.out_features + module.in_features),
            rank=module.rank,
            shape=(module.out_features, module.in_features),
        )
    if not layers:
        raise ValueError(f"{type(model).__name__} carries no corda_kernels adapters (LowRankLinear layers)")
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in seen)
    return ParameterReport(layers, other)
