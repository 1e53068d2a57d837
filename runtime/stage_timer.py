"""Per-stage timing of a diffusers pipeline run: :class:`StageTimer` accumulates time per stage (CUDA events on
a GPU, wall-clock on a CPU) and :func:`instrument` hooks a pipeline's text encoders, transformer and VAE decode
into it, whatever runs them (PyTorch modules or the runners of :mod:`runtime.pipeline_runner`)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Iterator

import torch

# The stages :func:`instrument` times (text encoders, transformer x steps, VAE decode).
STAGES = ("text_encoders", "transformer", "vae_decode")


class StageTimer:
    """Accumulates time per stage name. CUDA events on a GPU (resolved in :meth:`collect`), else perf_counter.

    Use ``timer.start(name)`` / ``timer.stop(name)`` (or ``with timer.stage(name)``); nested calls of the same
    stage count once (the outermost). ``collect()`` returns ``{stage: ms}`` and ``{stage: calls}`` and resets.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self._open: dict[str, list] = defaultdict(list)
        self._pending: list[tuple[str, Any, Any]] = []
        self._ms: dict[str, float] = defaultdict(float)
        self._calls: dict[str, int] = defaultdict(int)

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name].append(self._mark())

    def stop(self, name: str) -> None:
        begin = self._open[name].pop()
        if self._open[name]:
            return  # nested: the outer call counts
        end = self._mark()
        self._calls[name] += 1
        if self.cuda:
            self._pending.append((name, begin, end))
        else:
            self._ms[name] += (end - begin) * 1e3

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def collect(self) -> tuple[dict[str, float], dict[str, int]]:
        if self._pending:
            torch.cuda.synchronize()
            for name, a, b in self._pending:
                self._ms[name] += a.elapsed_time(b)
        ms, calls = dict(self._ms), dict(self._calls)
        self._pending, self._ms, self._calls = [], defaultdict(float), defaultdict(int)
        return ms, calls


@contextlib.contextmanager
def instrument(pipe, timer: StageTimer) -> Iterator[None]:
    """Time ``pipe``'s text encoders, transformer and VAE decode into ``timer`` while the block runs.

    Works for PyTorch modules and adapters alike (forward hooks; ``vae.decode`` wrapped on the instance).
    Hooks are removed on exit, so modules shared between pipelines are left untouched.
    """
    handles, restore = [], []

    def hook(module, stage):
        handles.append(module.register_forward_pre_hook(lambda *_: timer.start(stage)))
        handles.append(module.register_forward_hook(lambda *_: timer.stop(stage)))

    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"):
        m = getattr(pipe, attr, None)
        if isinstance(m, torch.nn.Module):
            hook(m, "text_encoders")
    hook(pipe.transformer, "transformer")
    vae = pipe.vae
    original = vae.decode
    had_attr = "decode" in vae.__dict__

    def timed_decode(*a, **k):
        with timer.stage("vae_decode"):
            return original(*a, **k)

    vae.decode = timed_decode
    restore.append(lambda: (vae.__dict__.__setitem__("decode", original) if had_attr else vae.__dict__.pop("decode", None)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for r in restore:
            r()
