"""One CUDA graph around any training step: the step's kernels issued by one replay.

Issuing a step's kernels one by one can take the host about as long as the GPU takes to
run them (the fused TopK step's ~30; bench/gpu_trainer.py), so the step is captured once
and replayed. The first call without aux runs the inner step eagerly on a side stream
(Triton compiles, the allocator and Adam's state fill: torch's warm-up recipe), the second
captures it and replays the capture; later calls copy x into the graph's input buffer and
replay. The graph writes the same StepStats tensors at every replay, so read them before
the next call. Calls with aux (prepare_aux gave something: AuxK's dead features, whose
count changes the shapes) and batches of another shape run eagerly.

The inner step must be capturable: no host sync without aux, lr and step counts on the
device (sae.fused_step.FusedTopKStep; sae.autograd_step.AutogradStep with capturable=True).
"""

from __future__ import annotations

from typing import Any

import torch

from sae.errors import SAEError
from sae.step import StepStats, TrainStep


class CudaGraphStep:
    """A TrainStep that replays `inner` (a TrainStep on CUDA) as one CUDA graph."""

    def __init__(self, inner: TrainStep) -> None:
        if not torch.cuda.is_available():
            raise SAEError("a CUDA graph step needs CUDA: use the `inner` step itself on this device")
        self.inner = inner
        self.kind = inner.kind
        self._stream = torch.cuda.Stream()
        self._warm = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._x: torch.Tensor | None = None
        self._out: StepStats | None = None

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)

    def prepare_aux(self, aux_weights: torch.Tensor | None) -> Any:
        return self.inner.prepare_aux(aux_weights)

    def __call__(self, x: torch.Tensor, aux: Any = None, target: torch.Tensor | None = None) -> StepStats:
        if target is not None:
            return self.inner(x, aux, target)
        if aux is not None or (self._graph is not None and x.shape != self._x.shape):
            return self.inner(x, aux)
        if self._graph is None:
            side = self._stream  # the warm-up runs where the capture will
            side.wait_stream(torch.cuda.current_stream())
            if not self._warm:
                self._warm = True
                with torch.cuda.stream(side):
                    stats = self.inner(x)
                torch.cuda.current_stream().wait_stream(side)
                return stats
            self._x = x.clone()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=side):
                self._out = self.inner(self._x)
        else:
            self._x.copy_(x)
        self._graph.replay()
        return self._out

    def optimizer_state(self) -> dict[str, Any]:
        return self.inner.optimizer_state()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.inner.load_optimizer_state(state)

    def weights_changed(self) -> None:
        self.inner.weights_changed()

    def weights_to_model(self) -> None:
        self.inner.weights_to_model()
