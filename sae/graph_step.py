"""CUDA graphs around any training step: the step's kernels issued by one replay.

Issuing a step's kernels one by one can take the host about as long as the GPU takes to
run them (the fused TopK step's ~30; bench/gpu_trainer.py), so the step is captured and
replayed. A step's shapes follow its batch's shape and its aux's (the aux capacity of
sae.aux_capacity), and a rule may switch selections (Mutual Choice's TopK start: its
graph_key), so there is one graph per (batch shape, aux shape, key). The first call of a
key runs the inner step eagerly on a side stream (Triton compiles, the allocator and Adam's
state fill: torch's warm-up recipe), the second captures it and replays the capture; later
calls copy x and the aux into the graph's input buffers and replay. A graph writes the
same StepStats tensors at every replay, so read them before its next call. At most
MAX_GRAPHS graphs are kept (each holds its own memory), the least recently used let go.
Transcoder calls (a target) run eagerly.

The inner step must be capturable: no host sync, lr and step counts on the device
(sae.fused_step.FusedTopKStep; sae.autograd_step.AutogradStep with capturable=True).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch

from sae.errors import SAEError
from sae.step import StepStats, TrainStep

#: Graphs kept at once; each holds the memory of one step's intermediates.
MAX_GRAPHS = 4


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    aux: tuple[torch.Tensor, ...]
    out: StepStats


def _parts(aux: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a step's aux (None, one tensor, or a tuple of them)."""
    if aux is None:
        return ()
    return (aux,) if isinstance(aux, torch.Tensor) else tuple(aux)


def _rebuilt(aux: Any, parts: tuple[torch.Tensor, ...]) -> Any:
    """aux's form (None, one tensor, or a tuple) holding `parts`."""
    if aux is None:
        return None
    return parts[0] if isinstance(aux, torch.Tensor) else tuple(parts)


class CudaGraphStep:
    """A TrainStep that replays `inner` (a TrainStep on CUDA) as CUDA graphs; key() names the
    selection the next step runs (a rule's graph_key: one graph each)."""

    def __init__(self, inner: TrainStep, key: Callable[[], Hashable] = lambda: None) -> None:
        if not torch.cuda.is_available():
            raise SAEError("a CUDA graph step needs CUDA: use the `inner` step itself on this device")
        self.inner, self.key = inner, key
        self.kind = inner.kind
        self._stream = torch.cuda.Stream()
        self._warm: set[Hashable] = set()
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)

    def prepare_aux(self, aux_weights: torch.Tensor | None) -> Any:
        return self.inner.prepare_aux(aux_weights)

    def __call__(self, x: torch.Tensor, aux: Any = None, target: torch.Tensor | None = None) -> StepStats:
        if target is not None:
            return self.inner(x, aux, target)
        parts = _parts(aux)
        key = (tuple(x.shape), tuple(p.shape for p in parts), self.key())
        captured = self._graphs.get(key)
        if captured is None:
            side = self._stream  # the warm-up and the capture run here
            side.wait_stream(torch.cuda.current_stream())
            if key not in self._warm:
                self._warm.add(key)
                with torch.cuda.stream(side):
                    stats = self.inner(x, aux)
                torch.cuda.current_stream().wait_stream(side)
                return stats
            static_x, static_aux = x.clone(), tuple(p.clone() for p in parts)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):  # capture_begin, not torch.cuda.graph: no gc pass or cache flush per capture
                graph.capture_begin()
                try:
                    out = self.inner(static_x, _rebuilt(aux, static_aux))
                finally:
                    graph.capture_end()
            captured = self._graphs[key] = _Captured(graph, static_x, static_aux, out)
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.x.copy_(x)
            for buffer, part in zip(captured.aux, parts):
                buffer.copy_(part)
        captured.graph.replay()
        return captured.out

    def optimizer_state(self) -> dict[str, Any]:
        return self.inner.optimizer_state()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.inner.load_optimizer_state(state)

    def weights_changed(self) -> None:
        self.inner.weights_changed()

    def weights_to_model(self) -> None:
        self.inner.weights_to_model()
