"""The search-space interface and the registry that builds spaces by name."""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, Iterator, List, Tuple

from models.errors import InvalidArchitectureError, UnknownNameError

# Largest input resolution a space is built for: larger inputs would exhaust memory, not search.
MAX_INPUT_SIZE = 1024


class SearchSpace:
    """Interface of every search space. A search strategy uses only this interface.

    An architecture is an immutable, hashable value. `params` and `flops` are computed
    from the encoding alone, so constraints filter candidates before any network is built.
    """

    name: str = ""
    input_size: int = 32
    num_classes: int = 10

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def to_string(self, arch: Any) -> str:
        return str(arch)

    def sample(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def mutate(self, arch: Any, rng: random.Random) -> Any:
        raise NotImplementedError

    def params(self, arch: Any) -> int:
        raise NotImplementedError

    def flops(self, arch: Any) -> int:
        raise NotImplementedError

    def build(self, arch: Any):
        raise NotImplementedError

    def is_degenerate(self, arch: Any) -> bool:
        """Return whether the network's output cannot depend on its input."""
        return False

    def enumerate(self) -> Iterator[Any]:
        raise NotImplementedError(f"search space {self.name!r} is too large to enumerate")

    def cost_range(self) -> Dict[str, Tuple[int, int]]:
        """Return the smallest and largest params and FLOPs that the space reaches."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"space": self.name, "input_size": self.input_size, "num_classes": self.num_classes}


_SPACES: Dict[str, Callable[..., SearchSpace]] = {}


def register_space(name: str) -> Callable[[Callable[..., SearchSpace]], Callable[..., SearchSpace]]:
    def decorator(factory: Callable[..., SearchSpace]) -> Callable[..., SearchSpace]:
        _SPACES[name] = factory
        return factory

    return decorator


def list_spaces() -> List[str]:
    _load_builtin_spaces()
    return sorted(_SPACES)


def get_space(name: str, **options: Any) -> SearchSpace:
    """Build a search space by name; options such as `num_classes` go to its factory."""
    _load_builtin_spaces()
    if name not in _SPACES:
        raise UnknownNameError(f"unknown search space {name!r}; known spaces: {', '.join(sorted(_SPACES))}")
    size = options.get("input_size")
    if size is not None and not 1 <= int(size) <= MAX_INPUT_SIZE:
        raise InvalidArchitectureError(f"input size {size} is out of range; use 1 to {MAX_INPUT_SIZE} pixels")
    return _SPACES[name](**options)


def _load_builtin_spaces() -> None:
    import models.spaces.autoformer  # noqa: F401  (registers autoformer-tiny, -small, -base)
    import models.spaces.mobilenetv2  # noqa: F401  (registers itself)
    import models.spaces.nb201_space  # noqa: F401  (registers itself)
