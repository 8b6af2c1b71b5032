"""Score many architectures one at a time, with a resumable cache and a progress bar."""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

import edge_runtime
from edge_runtime.score_cache import ScoreCache, protocol_key, split_cached
from models.proxies import ProxyResult, get_proxy
from models.proxies.scoring import score_architecture

logger = logging.getLogger(__name__)


@dataclass
class ScoringProtocol:
    """Everything that changes a score besides the architecture: stored with every result."""

    space: str
    num_classes: int
    input_size: int
    data_hash: str
    batch_size: int
    seed: int
    code_version: str = edge_runtime.__version__
    proxy_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Options that shape the networks besides the input size, such as MobileNetV2's width_mult.
    space_options: Dict[str, Any] = field(default_factory=dict)

    def key_for(self, proxy: str) -> str:
        spec = get_proxy(proxy)
        options = spec.default_options()
        options.update(self.proxy_options.get(proxy, {}))
        fields: Dict[str, Any] = {
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "data": self.data_hash,
            "batch": self.batch_size,
            "seed": self.seed,
            "version": self.code_version,
            "options": options,
        }
        # Added only when set, so the keys of spaces without such options stay as they were.
        if self.space_options:
            fields["space_options"] = dict(self.space_options)
        if spec.revision != 1:
            fields["revision"] = spec.revision
        return protocol_key(**fields)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "space": self.space,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "data_hash": self.data_hash,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "code_version": self.code_version,
            "space_options": dict(self.space_options),
            "proxy_options": {
                name: {**get_proxy(name).default_options(), **self.proxy_options.get(name, {})}
                for name in self.proxy_options
            },
        }


def score_archs(
    space: Any,
    archs: Sequence[Any],
    inputs: torch.Tensor,
    labels: Optional[torch.Tensor],
    proxies: Sequence[str],
    protocol: ScoringProtocol,
    *,
    cache: Optional[ScoreCache] = None,
    progress: bool = True,
    description: str = "scoring",
) -> Iterator[Tuple[Any, Dict[str, ProxyResult]]]:
    """Yield (arch, {proxy: result}) in input order; cached results are reused, new ones stored."""
    from tqdm import tqdm

    keys = {name: protocol.key_for(name) for name in proxies}
    bar = tqdm(total=len(archs), desc=description, unit="arch", disable=not progress, leave=False)
    try:
        for arch in archs:
            arch_text = space.to_string(arch)
            cached, missing = split_cached(cache, protocol.space, arch_text, proxies, keys)
            fresh: Dict[str, ProxyResult] = {}
            if missing:
                fresh = score_architecture(
                    space, arch, inputs, labels, missing, seed=protocol.seed, options=protocol.proxy_options
                )
                if cache is not None:
                    cache.put_many(protocol.space, arch_text, fresh, keys)
            bar.update(1)
            yield arch, {name: cached.get(name) or fresh[name] for name in proxies}
    finally:
        bar.close()


def timing_summary(rows: Iterable[Mapping[str, ProxyResult]], proxies: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Median and total seconds per proxy over the rows (cached results included as first measured)."""
    summary: Dict[str, Dict[str, float]] = {}
    for name in proxies:
        seconds: List[float] = [float(r[name].details.get("seconds", 0.0)) for r in rows if name in r]
        if seconds:
            summary[name] = {"median_ms": 1000 * statistics.median(seconds), "total_s": sum(seconds)}
    return summary


def forward_backward_seconds(network: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Wall time of one training-mode forward and backward pass: the reference cost for proxies."""
    from models.proxies._context import scoring_mode

    with scoring_mode(network):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(network(inputs), labels)
        loss.backward()
        elapsed = time.perf_counter() - start
    return elapsed


# Gradient proxies keep every activation of the forward pass for the backward pass and add a
# gradient of about the same size, so scoring needs about twice the forward activations (an estimate).
BACKWARD_MEMORY_FACTOR = 2.0


# Inputs above this size are measured at this size and scaled by area, so the check stays cheap.
ACTIVATION_PROBE_MAX_SIZE = 128


def activation_bytes_per_sample(network: torch.nn.Module, input_size: int, channels: int = 3) -> int:
    """Return the bytes of every leaf module's output for one sample, measured on a batch of two.

    A batch of two keeps BatchNorm in training mode valid. The sum over leaf outputs counts
    what a forward pass that records activations keeps in memory at once, an upper estimate for one
    that frees them early. Above ACTIVATION_PROBE_MAX_SIZE pixels the count is taken at that
    size and scaled by the area ratio.
    """
    # NOTE: the area scaling is exact for convolutions but underestimates attention maps, which
    # grow with the square of the token count.
    measured_size = min(input_size, ACTIVATION_PROBE_MAX_SIZE)
    scale = (input_size / measured_size) ** 2
    from models.proxies._context import forward_hooks, scoring_mode

    total = [0]

    def on_output(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in network.modules() if not list(m.children())]
    with scoring_mode(network), torch.no_grad(), forward_hooks(leaves, on_output):
        network(torch.zeros(2, channels, measured_size, measured_size))
    return int(total[0] * scale) // 2


def available_memory_bytes() -> Optional[int]:
    """Return MemAvailable from /proc/meminfo, or None where the system does not report it."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
