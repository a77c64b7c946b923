"""Training losses: FVU (the reconstruction loss), AuxK (Gao et al. 2024) and
aux_zipf (Ayonrinde 2024, our reconstruction of it; see aux_zipf_loss)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sae.code import SparseCode
from sae.kernels import sparse_decode

#: Zipf deficits below this are treated as none (see zipf_underuse).
UNDERUSE_FLOOR = 1e-3

#: At most this share of the features count as under-used, the furthest below the curve
#: (more only where more are tied there, such as the dead ones; see zipf_underuse).
UNDERUSE_SHARE = 0.25


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """sum ||x - mean(x)||^2 over the batch (kept above 0): the FVU's denominator."""
    return (x - x.mean(dim=0)).pow(2).sum().clamp(min=1e-12)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch."""
    return (x - x_hat).pow(2).sum() / batch_variance(x)


def aux_candidates(z: torch.Tensor, weights: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Per row, the k_aux features of largest z among those with weight > 0: LongTensor[B, k].

    k = min(k_aux, number of candidates); an empty [B, 0] when there are none. The top-k
    reads the candidates' columns of z only (no masked copy of the whole z)."""
    candidates = torch.nonzero(weights > 0).squeeze(1)
    k = min(k_aux, len(candidates))
    if k <= 0:
        return torch.zeros(z.shape[0], 0, dtype=torch.long, device=z.device)
    if len(candidates) == z.shape[1]:
        return torch.topk(z, k, dim=1, sorted=False).indices
    return candidates[torch.topk(z.index_select(1, candidates), k, dim=1, sorted=False).indices]


def aux_reconstruction_loss(
    aux_code: SparseCode, residual: torch.Tensor, weights: torch.Tensor, decode: Callable[[SparseCode], torch.Tensor]
) -> torch.Tensor:
    """||sum_j w_j a_j W_dec[i_j] - e||^2 / ||e - mean(e)||^2 over the batch, for the aux
    entries (i_j, a_j = ReLU(z)) chosen by aux_candidates; decode(code) = sum_j a_j W_dec[i_j]
    without b_dec (e already excludes it): SparseAutoencoder.decode_directions.

    The gradient reaches W_dec through the decode and W_enc / b_enc through a_j."""
    if aux_code.width == 0:
        return residual.new_zeros(())
    values = aux_code.values * weights[aux_code.indices].to(aux_code.values.dtype)
    return fvu(residual, decode(SparseCode(indices=aux_code.indices, values=values)))


def weighted_aux_loss(
    z: torch.Tensor, residual: torch.Tensor, weights: torch.Tensor, W_dec: torch.Tensor, k_aux: int,
    code: SparseCode | None = None,
) -> torch.Tensor:
    """The auxiliary loss from a dense z (reference form; training selects the same entries
    inside the fused encoder): candidates are features with weight > 0 outside the token's
    own code (code: the main code; SparseCode.outside); per token take the k_aux candidates
    with the largest z, activate them as a_j = w_j * ReLU(z_j), and return
    ||sum_j a_j W_dec[j] - e||^2 / ||e - mean(e)||^2 (sums over the batch)."""
    free = z if code is None else code.outside(z)
    indices = aux_candidates(free.detach(), weights, k_aux)
    aux_code = SparseCode(indices=indices, values=free.gather(1, indices).relu())
    return aux_reconstruction_loss(aux_code, residual, weights, lambda c: sparse_decode(c.indices, c.values, W_dec))


def auxk_loss(
    z: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor, k_aux: int,
    code: SparseCode | None = None,
) -> torch.Tensor:
    """AuxK: the dead features (bool [d_sae]) reconstruct the detached residual e = x - x_hat.

    L_aux = ||e_hat - e||^2 / ||e - mean(e)||^2, e_hat from the top-k_aux dead pre-activations
    (Gao et al. 2024, section A.2; k_aux about d_in / 2, weighted alpha = 1/32 by the trainer);
    code: the main code, whose entries take no aux slot (weighted_aux_loss).
    """
    return weighted_aux_loss(z, residual, dead.to(z.dtype), W_dec, k_aux, code)


def zipf_underuse(density: torch.Tensor, fit_fraction: float = 0.8) -> torch.Tensor:
    """Per-feature underuse u in [0, 1] against a Zipf curve fitted to the feature densities.

    Rank features by firing frequency (rank 1 = most frequent) and fit
    log d(r) = log A - s log r by least squares over the first `fit_fraction` of the live
    (d > 0) ranks, where the curve fits; the expected density at rank r is A r^-s.
    u_i = clamp(1 - d_i / (A r_i^-s), 0, 1): 1 for a dead feature, 0 for one at or above
    the curve; deficits under UNDERUSE_FLOOR (the fit's own noise) count as 0, so features on
    the curve never compete with under-used ones for the k_aux slots. A least-squares line
    has about half the features below it, most of them barely; so only the UNDERUSE_SHARE
    of the features with the largest deficits keep theirs (all of those tied at the cut:
    every dead feature when more are dead). The rest, whose activations the loss would scale
    by a small u, would otherwise take k_aux slots from the ones it is for, and make the aux
    products span most of the dictionary. With fewer than 2 live features there is no
    curve: u = 1[d == 0].
    """
    d_sae = density.numel()
    order = torch.argsort(density, descending=True)
    ranks = torch.empty(d_sae, device=density.device)
    ranks[order] = torch.arange(1, d_sae + 1, device=density.device, dtype=ranks.dtype)
    # the fit's ranks as a mask on the device: no host read of the live count
    n_fit = ((density > 0).sum() * fit_fraction).floor()
    log_r = torch.arange(1, d_sae + 1, device=density.device, dtype=torch.float64).log()
    fit = torch.arange(d_sae, device=density.device) < n_fit  # the n_fit most frequent ranks
    log_d = torch.where(fit, density[order].double().clamp(min=torch.finfo(torch.float64).tiny).log(), 0.0)
    count = fit.sum().clamp(min=1)
    mean_r = torch.where(fit, log_r, 0.0).sum() / count
    mean_d = log_d.sum() / count
    centred_r = torch.where(fit, log_r - mean_r, 0.0)
    slope = (centred_r * (log_d - mean_d)).sum() / centred_r.pow(2).sum().clamp(min=torch.finfo(torch.float64).tiny)
    log_a = mean_d - slope * mean_r
    expected = (log_a + slope * ranks.double().log()).exp()
    u = (1 - density.double() / expected).clamp(0, 1)
    u = torch.where(u < UNDERUSE_FLOOR, torch.zeros_like(u), u)
    cut = u.topk(max(1, int(UNDERUSE_SHARE * d_sae))).values.min()  # on the device: no host read
    u = torch.where(u >= cut, u, torch.zeros_like(u))
    return torch.where(n_fit < 2, (density <= 0).double(), u).to(density.dtype)


def aux_zipf_loss(
    z: torch.Tensor,
    residual: torch.Tensor,
    density: torch.Tensor,
    W_dec: torch.Tensor,
    k_aux: int,
    fit_fraction: float = 0.8,
    code: SparseCode | None = None,
) -> torch.Tensor:
    """aux_zipf_loss: AuxK generalised from dead to under-used features, weighted by deficit.

    Formula (as implemented):
        d_i      firing frequency of feature i over recent tokens (trainer's running estimate)
        r_i      rank of d_i, 1 = most frequent
        A, s     least-squares fit of log d_i = log A - s log r_i on the head of the live ranks
        u_i      = clamp(1 - d_i / (A r_i^-s), 0, 1), set to 0 below 1e-3 and outside the
                   quarter of the features with the largest u (ties kept)  (zipf_underuse)
        T(x)     = the k_aux features with u_i > 0 of largest z_i(x), outside x's own code
                   (code; a feature x already uses is not trained again on x's residual)
        e        = x - x_hat (detached)
        e_hat    = sum_{i in T(x)} u_i ReLU(z_i(x)) W_dec[i]
        L        = sum_x ||e_hat - e||^2 / sum_x ||e - mean(e)||^2
    If only dead features fall below the curve (u = 1 for them, 0 elsewhere) this is exactly
    auxk_loss, which is the sense in which the paper says it "generalises aux_k_loss". Leaving
    out x's own code is ours: it keeps AuxK's premise (the aux features explain what x's code
    did not) for features that are live.

    Provenance: Ayonrinde 2024 (arXiv:2411.02124) introduces aux_zipf_loss to push dead and
    under-used features, measured against the Zipf curve that feature densities follow except
    at the low end. Its exact equation could not be retrieved from this sandbox (only the
    abstract and reviews were reachable), so this is our reconstruction from that definition;
    check it against the paper's section on aux_zipf_loss before relying on exact numbers.
    """
    weights = zipf_underuse(density, fit_fraction)
    return weighted_aux_loss(z, residual, weights, W_dec, k_aux, code)
