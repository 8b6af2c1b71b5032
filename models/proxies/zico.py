"""ZiCo (Li et al., ICLR 2023): zero-shot proxy from the inverse coefficient of variation of gradients.

The probe batch is split into M micro-batches and the cross-entropy gradient of every
convolution and linear weight is taken on each. Per layer, the score sums mean|g| / std(g)
over the weights whose gradient varies across micro-batches, takes the log, and adds
the layers up. Gradients that are large and consistent across samples score high.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from models.proxies._context import ProbeContext, scoring_mode
from models.proxies._registry import CLOUD, ProxyInvalid, register_proxy
from models.proxies.grad_norm import reject_degenerate, weight_gradients, weight_layers


def micro_batch_gradients(context: ProbeContext, micro_batches: int) -> List[torch.Tensor]:
    """Return one float64 tensor per convolution or linear layer: M x (weights of the layer).

    `torch.tensor_split` makes the micro-batches as equal as possible; the first ones get
    one sample more when M does not divide the batch. Every micro-batch gets its own
    gradient from `torch.autograd.grad`, so nothing accumulates between them.
    """
    network = context.network
    weights = [module.weight for _, module in weight_layers(network)]
    per_layer: List[List[torch.Tensor]] = [[] for _ in weights]
    input_chunks = torch.tensor_split(context.inputs, micro_batches)
    label_chunks = torch.tensor_split(context.labels, micro_batches)
    with scoring_mode(network):
        for weight in weights:
            weight.requires_grad_(True)
        for inputs, labels in zip(input_chunks, label_chunks):
            loss = F.cross_entropy(network(inputs), labels)
            for store, gradient in zip(per_layer, weight_gradients(loss, weights)):
                store.append(gradient.detach().to(torch.float64).flatten())
    return [torch.stack(store) for store in per_layer]


def layer_terms(gradients: torch.Tensor) -> torch.Tensor:
    """Sum mean|g| / std(g) over the weights of one layer whose gradient std is nonzero.

    `gradients` is M x (weights). The std is the population std (divisor M), as in the
    ZiCo reference code. Returns 0 when no weight has a nonzero std.
    """
    mean_abs = gradients.abs().mean(dim=0)
    std = (gradients - gradients.mean(dim=0)).pow(2).mean(dim=0).sqrt()
    varying = std > 0
    return (mean_abs[varying] / std[varying]).sum()


@register_proxy(
    "zico",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=True,
    batches=1,
    runs_on=(CLOUD,),
    options={"micro_batches": 2},
    description="Sum over layers of log(sum of mean|g| / std(g)) across micro-batches of the probe batch",
)
def zico(context: ProbeContext, micro_batches: int = 2) -> float:
    """Return the ZiCo score, splitting the probe batch into `micro_batches` parts (at least 2).

    Layers whose gradients are zero or identical across micro-batches contribute nothing
    and are skipped rather than adding log(0).
    """
    if micro_batches < 2:
        raise ValueError(f"zico needs micro_batches >= 2 to measure gradient variation, got {micro_batches}")
    batch = context.inputs.shape[0]
    if batch < micro_batches:
        raise ProxyInvalid(
            f"the probe batch has {batch} samples, fewer than the {micro_batches} micro-batches zico needs"
        )
    reject_degenerate(context)

    sums = torch.stack([layer_terms(g) for g in micro_batch_gradients(context, micro_batches)])
    positive_sums = sums[torch.isfinite(sums) & (sums > 0)]
    if positive_sums.numel() == 0:
        raise ProxyInvalid(
            "no convolution or linear layer has a gradient that varies across micro-batches, "
            "so every ZiCo term is undefined"
        )
    return float(torch.log(positive_sums).sum())
