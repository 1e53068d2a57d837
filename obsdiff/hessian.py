"""Forward hooks that accumulate timestep-weighted input Hessians of ``nn.Linear`` layers.

For every hooked layer, each forward call adds ``w_t * X^T X`` (``X``: the layer input flattened to
``(tokens, in_features)``, float32) to a running sum and ``w_t * tokens`` to a weighted count, where
``w_t`` is the weight of the current sampling step (set by the driver from the pipeline's step callback).
``H = sum / count``. Products ``X^T X`` are float32; the running sums are float64, so the result does not
depend (to float32 precision) on the order the samples arrive in: a split of the prompts over ranks
all-reduces to the single-process Hessian. ``hessian()`` returns float32.

Layers fed the very same input tensor (``to_q``/``to_k``/``to_v`` of one attention) share one accumulator;
the sharing is checked on every call.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


class HessianCollector:
    """Accumulates ``sum_t w_t X_t^T X_t`` and ``sum_t w_t n_t`` for a set of linear layers.

    modules: qualified name -> ``nn.Linear``.
    share: lists of names whose layers always receive the same input tensor; each list gets one
        accumulator (the first name's), and the collector raises if a member ever sees another input.
    device: where sums live (default: the device of each layer's input). Sums are float64.
    Use as a context manager (hooks are removed on exit); set :attr:`weight` before each step.
    """

    def __init__(self, modules: Mapping[str, nn.Linear], share: Iterable[Iterable[str]] = (), device: torch.device | str | None = None):
        self.modules = dict(modules)
        self.device = torch.device(device) if device is not None else None
        self.weight = 1.0
        self.key_of: dict[str, str] = {name: name for name in self.modules}
        for group in share:
            group = [g for g in group if g in self.modules]
            for name in group[1:]:
                self.key_of[name] = group[0]
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self._last: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._handles: list = []

    # -- hooks -------------------------------------------------------------------------------------
    def __enter__(self) -> "HessianCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        key = self.key_of[name]
        leader = key == name

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach()
            sig = (x.data_ptr(), tuple(x.shape))
            if not leader:
                if self._last.get(key) != sig:
                    raise RuntimeError(f"layer {name} does not share its input with {key}; the Hessian sharing assumption is wrong for this model")
                return
            self._last[key] = sig
            self._accumulate(key, x)

        return hook

    @torch.no_grad()
    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if self.device is not None:
            x2 = x2.to(self.device)
        x2 = x2.float()
        if key not in self.sums:
            n = x2.shape[1]
            self.sums[key] = torch.zeros(n, n, dtype=torch.float64, device=x2.device)
            self.counts[key] = torch.zeros((), dtype=torch.float64, device=x2.device)
        self.sums[key].add_(x2.T @ x2, alpha=float(self.weight))  # (in, in), float32 product, float64 sum
        self.counts[key] += float(self.weight) * x2.shape[0]

    # -- results -----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Accumulator keys (one per distinct input), in module order."""
        return list(dict.fromkeys(self.key_of[n] for n in self.modules))

    def hessian(self, name: str) -> torch.Tensor:
        """Normalised Hessian ``sum / count`` of layer ``name`` (float32, ``(in, in)``)."""
        key = self.key_of[name]
        if key not in self.sums:
            raise RuntimeError(f"layer {name} saw no input during calibration")
        return (self.sums[key] / self.counts[key].clamp_min(1e-12)).to(torch.float32)

    def pop(self, name: str) -> None:
        """Free the accumulator of ``name`` once every layer sharing it has been solved."""
        key = self.key_of[name]
        self.sums.pop(key, None)
        self.counts.pop(key, None)

    def ensure_all(self, device: torch.device | str) -> None:
        """Create zero accumulators for keys that saw no input (a rank with no prompts), so every rank
        all-reduces the same tensor list."""
        for key in self.keys():
            if key not in self.sums:
                n = self.modules[key].in_features
                self.sums[key] = torch.zeros(n, n, dtype=torch.float64, device=device)
                self.counts[key] = torch.zeros((), dtype=torch.float64, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """All sums and counts, in a fixed order (for all-reduce across ranks)."""
        return [t for k in self.keys() if k in self.sums for t in (self.sums[k], self.counts[k])]
