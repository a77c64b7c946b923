"""How many feature columns the fused step's auxiliary loss gathers, chosen without a host sync.

The auxiliary loss (AuxK's dead features, aux_zipf's under-used ones) reaches the features
of positive weight, a count that lives on the device and changes from step to step. Reading
it every step would stop the host until the GPU caught up, and a step whose shapes follow
it could not be a CUDA graph. So the step gathers a capacity of columns instead: the
features of largest weight, the ones of weight 0 among them padding that adds nothing. The
count is copied to the host without waiting and read a step or more late, when it has
arrived; the capacity is a power-of-two multiple of AUX_COLUMNS with headroom above that
count (so it changes seldom: one CUDA graph per capacity), grows at once when the count
nears it and shrinks when the count falls under a quarter of it. A count that outgrows the
capacity before the host sees it keeps the capacity's largest weights for those steps. On
the CPU (where the read costs nothing), and where processes must agree on the capacity
(sae.fused_data_parallel), the count is read at once at every step.
"""

from __future__ import annotations

import torch

#: The capacity is this many columns times a power of two (at most d_sae).
AUX_COLUMNS = 64

#: The capacity holds at least this multiple of the count last read.
HEADROOM = 1.25


def capacity_for(count: int, limit: int) -> int:
    """The smallest AUX_COLUMNS * 2^j holding count * HEADROOM, at most limit (0 for no count)."""
    if count <= 0:
        return 0
    columns = AUX_COLUMNS
    while columns < count * HEADROOM and columns < limit:
        columns *= 2
    return min(columns, limit)


class AuxCapacity:
    """The number of aux columns for each step of one trainer, from its aux weights [d_sae]."""

    def __init__(self, d_sae: int, wait: bool = False) -> None:
        """wait: read the count at every step (the same capacity on every process)."""
        self.d_sae, self.wait = d_sae, wait
        self.columns = 0
        self._count: int | None = None  # the count last read on the host
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def __call__(self, weights: torch.Tensor) -> int:
        """The columns this step gathers (0: none, the count last read was 0)."""
        count = (weights > 0).sum()
        if self.wait or weights.device.type != "cuda":
            self._count = int(count)
            return self._resize()
        if self._count is None:
            self._count = int(count)  # the run's one wait, at its first aux step
        elif self._pending is not None and self._pending[1].query():
            self._count = int(self._pending[0])
        if self._pending is None or self._pending[1].query():
            host = self._pending[0] if self._pending else torch.empty((), dtype=torch.long, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        return self._resize()

    def _resize(self) -> int:
        wanted = capacity_for(self._count, self.d_sae)
        if wanted > self.columns or self._count * 4 < self.columns:
            self.columns = wanted
        return self.columns
