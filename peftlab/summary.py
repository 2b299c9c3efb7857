"""Trainable vs total parameter counts, grouped by module kind."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class SummaryRow:
    kind: str
    trainable: int = 0
    total: int = 0


@dataclass
class ParameterSummary:
    """Counts per kind: base module classes (``Linear``, ``Embedding``…) and adapter parts (``lora [default]``).

    4-bit weights count as the parameters they represent, not as packed bytes.
    """

    rows: list[SummaryRow] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        """One line: ``trainable params: … || all params: … || trainable%: …``."""
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

    def __str__(self) -> str:
        width = max([len(r.kind) for r in self.rows] + [5])
        lines = [f"{'kind':<{width}}  {'trainable':>14}  {'total':>14}  {'trainable %':>11}"]
        for r in self.rows + [SummaryRow("total", self.trainable, self.total)]:
            pct = 100.0 * r.trainable / r.total if r.total else 0.0
            lines.append(f"{r.kind:<{width}}  {r.trainable:>14,}  {r.total:>14,}  {pct:>10.2f}%")
        return "\n".join(lines)


def _count(numel: int, trainable: bool, row: SummaryRow) -> None:
    row.total += numel
    row.trainable += numel if trainable else 0


def summarize(base_model: nn.Module, adapters: dict[str, nn.Module]) -> ParameterSummary:
    """Count the base model's parameters by owning module class, and each adapter's by kind."""
    rows: dict[str, SummaryRow] = {}
    seen: set[int] = set()
    for module in base_model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            numel = getattr(module, "weight_numel", param.numel()) if pname == "weight" else param.numel()
            kind = type(module).__name__
            _count(numel, param.requires_grad, rows.setdefault(kind, SummaryRow(kind)))
    for name, adapter in adapters.items():
        kinds = adapter.parameter_kinds()
        for pname, param in adapter.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            kind = f"{kinds[pname]} [{name}]"
            _count(param.numel(), param.requires_grad, rows.setdefault(kind, SummaryRow(kind)))
    return ParameterSummary(list(rows.values()))
