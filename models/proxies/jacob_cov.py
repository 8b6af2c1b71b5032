"""Jacobian covariance (Mellor et al., 2020, first version of NASWOT; "jacob_cov" in Abdelfattah et al., ICLR 2021).

Each sample's Jacobian is the gradient of the sum of all outputs with respect to that
sample's input. A network that distinguishes the probe samples has weakly correlated
Jacobians, so the eigenvalues of their correlation matrix stay away from zero.
"""
from __future__ import annotations

import torch

from models.proxies._context import ProbeContext, scoring_mode
from models.proxies._registry import CLOUD, ProxyInvalid, register_proxy
from models.proxies.grad_norm import reject_degenerate

# Shift k added to every eigenvalue before log(v + k) + 1 / (v + k), the value used by
# Mellor et al. A zero eigenvalue then lowers the score by log(k) + 1 / k (about 1e5), not infinitely.
EIGENVALUE_SHIFT = 1e-5


def input_jacobians(context: ProbeContext) -> torch.Tensor:
    """Return the B x D float64 matrix whose row i is d(sum of outputs) / d(input i).

    BatchNorm uses batch statistics, as in the zero-cost-nas reference code, so a row
    carries the sample's effect on the other samples' outputs through the batch mean and
    variance.
    """
    network = context.network
    with scoring_mode(network):
        for parameter in network.parameters():
            parameter.requires_grad_(False)  # only the input gradient is needed
        inputs = context.inputs.detach().clone().requires_grad_(True)
        output = network(inputs).sum()
        jacobian = None
        if output.requires_grad:
            (jacobian,) = torch.autograd.grad(output, [inputs], allow_unused=True)
    if jacobian is None:
        raise ProxyInvalid("the network output does not depend on its input")
    return jacobian.detach().reshape(inputs.shape[0], -1).to(torch.float64)


def correlation_score(rows: torch.Tensor) -> torch.Tensor:
    """Compute -sum(log(v + k) + 1 / (v + k)) over the eigenvalues v of the rows' correlation matrix."""
    if rows.shape[0] < 2:
        raise ProxyInvalid(f"the Jacobian correlation needs at least 2 probe samples, got {rows.shape[0]}")
    centred = rows - rows.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=1)
    constant = int((norms == 0).sum())
    if constant:
        raise ProxyInvalid(
            f"the input Jacobian of {constant} of {rows.shape[0]} probe samples is constant, "
            "so its correlation with the others is undefined"
        )
    unit = centred / norms.unsqueeze(1)
    correlation = (unit @ unit.t()).clamp(-1.0, 1.0)
    # A correlation matrix is positive semi-definite. Rounding can push its zero eigenvalues
    # slightly below zero, which the clamp undoes.
    eigenvalues = torch.linalg.eigvalsh(correlation).clamp(min=0.0)
    shifted = eigenvalues + EIGENVALUE_SHIFT
    return -(torch.log(shifted) + 1.0 / shifted).sum()


@register_proxy(
    "jacob_cov",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=False,
    batches=1,
    runs_on=(CLOUD,),
    options={},
    description="-sum(log(v + k) + 1/(v + k)) over eigenvalues v of the per-sample input-Jacobian correlation matrix",
)
def jacob_cov(context: ProbeContext) -> float:
    """Score how weakly the probe samples' input Jacobians correlate (higher is better)."""
    reject_degenerate(context)
    score = correlation_score(input_jacobians(context))
    if not bool(torch.isfinite(score)):
        raise ProxyInvalid(f"the Jacobian correlation score is not finite ({float(score)})")
    return float(score)
