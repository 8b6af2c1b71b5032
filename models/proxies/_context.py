"""The scoring context shared by every proxy: one network, one probe batch, scoped side effects."""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from models.proxies._registry import NEEDS_BLOCK_OUTPUTS, NEEDS_RELU_KERNEL


@contextlib.contextmanager
def scoring_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Put the network in training mode (BatchNorm uses batch statistics) and restore it after.

    Training flags, buffers (BatchNorm running statistics) and `requires_grad` flags are
    restored on exit, also when the body raises. Gradients are cleared.
    """
    flags = {name: module.training for name, module in network.named_modules()}
    buffers = {name: buffer.detach().clone() for name, buffer in network.named_buffers()}
    requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
    network.train()
    try:
        yield network
    finally:
        with torch.no_grad():
            for name, buffer in network.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        for name, module in network.named_modules():
            module.train(flags.get(name, module.training))
        for name, p in network.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        network.zero_grad(set_to_none=True)


@contextlib.contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: Callable[..., Any]) -> Iterator[None]:
    """Register `hook` on each module and remove every handle on exit, also on exceptions."""
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def forward_pre_hooks(modules: Iterable[nn.Module], hook: Callable[..., Any]) -> Iterator[None]:
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


# Activations whose input sign defines an activation pattern: ReLU and its smooth variants,
# so that pattern-based proxies also read transformers (GELU) and MobileNets (ReLU6).
RECTIFIER_TYPES = (nn.ReLU, nn.ReLU6, nn.GELU)


def relu_modules(network: nn.Module) -> List[nn.Module]:
    """Return the leaf rectifier modules (ReLU, ReLU6, GELU), each once, so that no container is hooked."""
    return [m for m in network.modules() if isinstance(m, RECTIFIER_TYPES)]


def block_modules(network: nn.Module) -> List[nn.Module]:
    taps = getattr(network, "feature_taps", None)
    if taps is None:
        raise TypeError(f"{type(network).__name__} exposes no feature_taps(); build it from a registered search space")
    return [module for _, module in taps()]


@dataclass
class ForwardRecord:
    """Tensors recorded by the single shared forward pass."""

    logits: torch.Tensor
    block_inputs: List[torch.Tensor] = field(default_factory=list)
    block_outputs: List[torch.Tensor] = field(default_factory=list)
    relu_kernel: Optional[torch.Tensor] = None
    seconds: float = 0.0


def record_forward(network: nn.Module, inputs: torch.Tensor, needs: Iterable[str]) -> ForwardRecord:
    """Run one no-grad forward pass in scoring mode and record what the requested proxies read.

    With NEEDS_RELU_KERNEL, the B x B Hamming-similarity kernel of the ReLU activation
    patterns (NASWOT) is accumulated in float64 while the pass runs, so the binary codes
    themselves are never stored.
    """
    needs = set(needs)
    record_blocks = NEEDS_BLOCK_OUTPUTS in needs
    batch = inputs.shape[0]
    block_inputs: List[torch.Tensor] = []
    block_outputs: List[torch.Tensor] = []
    kernel = torch.zeros(batch, batch, dtype=torch.float64) if NEEDS_RELU_KERNEL in needs else None

    def on_block(module: nn.Module, args: Sequence[torch.Tensor], output: torch.Tensor) -> None:
        block_inputs.append(args[0].detach())
        block_outputs.append(output.detach())

    def on_relu(module: nn.Module, args: Sequence[torch.Tensor]) -> None:
        codes = (args[0].detach().reshape(batch, -1) > 0).to(torch.float32)
        # Agreements = shared ones + shared zeros; each term is exact in float32 per layer.
        ones = codes @ codes.t()
        width = codes.shape[1]
        row = codes.sum(dim=1, keepdim=True)
        zeros = width - row - row.t() + ones
        kernel.add_((ones + zeros).to(torch.float64))

    start = time.perf_counter()
    with scoring_mode(network), torch.no_grad(), contextlib.ExitStack() as stack:
        if record_blocks:
            stack.enter_context(forward_hooks(block_modules(network), on_block))
        if kernel is not None:
            stack.enter_context(forward_pre_hooks(relu_modules(network), on_relu))
        logits = network(inputs)
    return ForwardRecord(
        logits=logits.detach(),
        block_inputs=block_inputs,
        block_outputs=block_outputs,
        relu_kernel=kernel,
        seconds=time.perf_counter() - start,
    )


def build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a network whose initial weights depend only on `seed`; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class ProbeContext:
    """One architecture's untrained network and the probe batch every proxy reads.

    The network is built lazily with weights fixed by `seed`. Proxies that change weights
    (SynFlow) call `fresh_network()` for their own copy. The shared forward pass runs once,
    on first request, recording everything the requested forward-only proxies declared.
    """

    def __init__(
        self,
        space: Any,
        arch: Any,
        inputs: torch.Tensor,
        labels: Optional[torch.Tensor],
        *,
        seed: int = 0,
        forward_needs: Iterable[str] = (),
    ) -> None:
        self.space = space
        self.arch = arch
        self.inputs = inputs
        self.labels = labels
        self.seed = seed
        self.num_classes = space.num_classes
        self.forward_needs = set(forward_needs)
        self._network: Optional[nn.Module] = None
        self._record: Optional[ForwardRecord] = None
        self.cache: Dict[str, Any] = {}  # intermediate results shared between proxies

    @property
    def network(self) -> nn.Module:
        if self._network is None:
            self._network = build_seeded(lambda: self.space.build(self.arch), self.seed)
        return self._network

    def fresh_network(self) -> nn.Module:
        """Return a private copy of the network with the same initial weights."""
        return copy.deepcopy(self.network)

    def forward_record(self, needs: Iterable[str] = ()) -> ForwardRecord:
        requested = self.forward_needs | set(needs)
        if self._record is not None:
            missing_blocks = NEEDS_BLOCK_OUTPUTS in requested and not self._record.block_outputs
            missing_kernel = NEEDS_RELU_KERNEL in requested and self._record.relu_kernel is None
            if not (missing_blocks or missing_kernel):
                return self._record
        self.forward_needs = requested
        self._record = record_forward(self.network, self.inputs, requested)
        return self._record

    def generator(self, offset: int = 0) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1000003 + offset)
        return generator

    @property
    def params(self) -> int:
        return self.space.params(self.arch)

    @property
    def flops(self) -> int:
        return self.space.flops(self.arch)

    @property
    def degenerate(self) -> bool:
        return self.space.is_degenerate(self.arch)

    def release(self) -> None:
        self._network = None
        self._record = None
        self.cache.clear()
