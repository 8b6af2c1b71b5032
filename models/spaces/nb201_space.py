"""NAS-Bench-201 behind the generic search-space interface."""
from __future__ import annotations

import random
from typing import Dict, Iterator, Tuple

from models.spaces import nb201
from models.spaces._registry import SearchSpace, register_space


class NB201Space(SearchSpace):
    name = "nb201"

    def __init__(self, *, num_classes: int = 10, input_size: int = 32) -> None:
        self.config = nb201.NB201Config(num_classes=num_classes, input_size=input_size)
        self.num_classes = num_classes
        self.input_size = input_size

    def parse(self, text: str) -> nb201.NB201Arch:
        return nb201.parse_arch(text)

    def to_string(self, arch: nb201.NB201Arch) -> str:
        return arch.to_string()

    def sample(self, rng: random.Random) -> nb201.NB201Arch:
        return nb201.sample_arch(rng)

    def mutate(self, arch: nb201.NB201Arch, rng: random.Random) -> nb201.NB201Arch:
        return nb201.mutate_arch(arch, rng)

    def params(self, arch: nb201.NB201Arch) -> int:
        return nb201.count_params(arch, self.config)

    def flops(self, arch: nb201.NB201Arch) -> int:
        return nb201.count_flops(arch, self.config)

    def build(self, arch: nb201.NB201Arch):
        return nb201.build_network(arch, self.config)

    def build_thin(self, arch: nb201.NB201Arch):
        """Build the same cell with one channel and one cell per stage.

        TE-NAS counts linear regions on such a thin copy, where tiny inputs do not put
        every sample in a region of its own.
        """
        thin = nb201.NB201Config(num_classes=self.config.num_classes, input_size=4, channels=1, cells_per_stage=1)
        return nb201.build_network(arch, thin)

    def is_degenerate(self, arch: nb201.NB201Arch) -> bool:
        return not arch.has_path()

    def enumerate(self) -> Iterator[nb201.NB201Arch]:
        return nb201.enumerate_archs()

    def cost_range(self) -> Dict[str, Tuple[int, int]]:
        return nb201.cost_range(self.config)


@register_space("nb201")
def _make_nb201(*, num_classes: int = 10, input_size: int = 32) -> NB201Space:
    return NB201Space(num_classes=num_classes, input_size=input_size)
