"""The AutoFormer vision-transformer search spaces (Tiny, Small, Base): encoding, analytic cost, registration.

AutoFormer (Chen et al., ICCV 2021) searches a ViT with one embedding dimension shared by
every layer, a depth, and per layer the number of attention heads and the MLP ratio.
Each head has dimension 64, so a layer's query, key and value width is 64 x heads. The
fixed parts follow ViT/DeiT: a 16x16 patch-embedding convolution, a class token and a
learned absolute position embedding. Then come pre-norm transformer blocks, each with
LayerNorm and multi-head attention, then LayerNorm and a GELU MLP, both with a residual
connection. A final LayerNorm and a linear head on the class token end the network.
AutoFormer's optional relative position encoding is not part of these spaces.

Canonical string: `e<embedding dim>` then '_' then the layers joined by '-', each layer
written `h<heads>m<MLP ratio>` with the ratio to one decimal. The depth is the layer
count. The released AutoFormer-T subnet reads

    e192_h3m3.5-h3m3.5-h3m3.0-h3m3.5-h3m3.0-h3m3.0-h3m4.0-h3m4.0-h3m3.5-h3m4.0-h4m3.5-h3m4.0-h3m3.5

Params count every parameter (LayerNorm affine, class token and position embedding
included). FLOPs are the multiply-adds of the patch-embedding convolution, the linear
layers, and the two attention matrix products (Q K^T and attention x V). AutoFormer's own
complexity count (`get_complexity` in its code) also adds the attention products.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from models.errors import InvalidArchitectureError
from models.spaces._registry import SearchSpace, register_space

HEAD_DIM = 64
PATCH_SIZE = 16

LAYER_SEPARATOR = "-"
EMBED_SEPARATOR = "_"

Layer = Tuple[int, float]  # (attention heads, MLP ratio)


@dataclass(frozen=True)
class AutoFormerChoices:
    """The values one AutoFormer space allows for each decision."""

    embed_dims: Tuple[int, ...]
    heads: Tuple[int, ...]
    mlp_ratios: Tuple[float, ...]
    depths: Tuple[int, ...]

    def __post_init__(self) -> None:
        # Shrinking steps to the next smaller value by position, so each tuple must ascend.
        for values in (self.embed_dims, self.heads, self.mlp_ratios, self.depths):
            if not values or list(values) != sorted(set(values)):
                raise ValueError(f"choices must be non-empty, ascending and distinct, got {values}")


# The search spaces of the AutoFormer repository's experiments/subnet/AutoFormer-{T,S,B}.yaml.
# NOTE: The Tiny space there lists MLP ratios 3.5 and 4 only, but the released AutoFormer-T
# subnet uses 3.0 in five of its layers. Tiny allows 3.0 here, as Small and Base do, so that
# the released subnet lies in the space.
VARIANTS: Dict[str, AutoFormerChoices] = {
    "tiny": AutoFormerChoices(embed_dims=(192, 216, 240), heads=(3, 4), mlp_ratios=(3.0, 3.5, 4.0), depths=(12, 13, 14)),
    "small": AutoFormerChoices(embed_dims=(320, 384, 448), heads=(5, 6, 7), mlp_ratios=(3.0, 3.5, 4.0), depths=(12, 13, 14)),
    "base": AutoFormerChoices(embed_dims=(528, 576, 624), heads=(8, 9, 10), mlp_ratios=(3.0, 3.5, 4.0), depths=(14, 15, 16)),
}


def _format_ratio(ratio: float) -> str:
    """Write a ratio with one decimal (3.0, 3.5), or in full when one decimal would round it."""
    text = f"{ratio:.1f}"
    return text if float(text) == ratio else repr(ratio)


@dataclass(frozen=True)
class AutoFormerArch:
    """One subnet: the shared embedding dimension and each layer's (heads, MLP ratio). The depth is the layer count.

    The constructor checks only the form. Whether the values belong to a given space is
    checked by that space's `validate`.
    """

    embed_dim: int
    layers: Tuple[Layer, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise InvalidArchitectureError(f"the embedding dimension must be a positive integer, got {self.embed_dim!r}")
        if not self.layers:
            raise InvalidArchitectureError("an AutoFormer architecture needs at least one layer")
        for index, (heads, ratio) in enumerate(self.layers):
            if not isinstance(heads, int) or heads < 1:
                raise InvalidArchitectureError(f"layer {index + 1}: heads must be a positive integer, got {heads!r}")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
                raise InvalidArchitectureError(f"layer {index + 1}: the MLP ratio must be positive, got {ratio!r}")
        # Store ratios as floats so that 3 and 3.0 give one value, one hash and one string.
        object.__setattr__(self, "layers", tuple((heads, float(ratio)) for heads, ratio in self.layers))

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def heads(self) -> Tuple[int, ...]:
        return tuple(heads for heads, _ in self.layers)

    @property
    def mlp_ratios(self) -> Tuple[float, ...]:
        return tuple(ratio for _, ratio in self.layers)

    def to_string(self) -> str:
        layers = LAYER_SEPARATOR.join(f"h{heads}m{_format_ratio(ratio)}" for heads, ratio in self.layers)
        return f"e{self.embed_dim}{EMBED_SEPARATOR}{layers}"

    def __str__(self) -> str:
        return self.to_string()


def _released(embed_dim: int, heads: Sequence[int], ratios: Sequence[float]) -> AutoFormerArch:
    return AutoFormerArch(embed_dim, tuple(zip(heads, ratios)))


# The released subnets (the AutoFormer repository's experiments/subnet/AutoFormer-{T,S,B}.yaml).
AUTOFORMER_T = _released(
    192,
    (3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 3, 3),
    (3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0, 3.5),
)
AUTOFORMER_S = _released(
    384,
    (6, 6, 5, 7, 5, 5, 5, 6, 6, 7, 7, 6, 7),
    (3.0, 3.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.5, 4.0),
)
AUTOFORMER_B = _released(
    576,
    (9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10),
    (3.5, 3.5, 4.0, 3.5, 4.0, 3.5, 3.5, 3.0, 4.0, 4.0, 3.0, 4.0, 3.0, 3.5),
)

_EXAMPLE = AUTOFORMER_T.to_string()


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(value) for value in values)


def _parse_number(text: str, convert, what: str, where: str):
    try:
        return convert(text)
    except ValueError:
        raise InvalidArchitectureError(f"{where}: {what} {text!r} is not a number") from None


def _parse_layer(token: str, index: int) -> Layer:
    where = f"layer {index + 1}"
    heads_text, separator, ratio_text = token[1:].partition("m")
    if not token.startswith("h") or not separator:
        raise InvalidArchitectureError(f"{where}: {token!r} is not written as h<heads>m<MLP ratio>, e.g. h3m3.5")
    return _parse_number(heads_text, int, "heads", where), _parse_number(ratio_text, float, "MLP ratio", where)


def parse_arch(text: str) -> AutoFormerArch:
    """Parse the canonical string into an architecture. A space's `validate` checks the values against that space."""
    if not isinstance(text, str):
        raise InvalidArchitectureError(f"expected an AutoFormer architecture string, got {type(text).__name__}")
    stripped = text.strip()
    try:
        embed_text, separator, layers_text = stripped.partition(EMBED_SEPARATOR)
        if not embed_text.startswith("e") or not separator:
            raise InvalidArchitectureError(
                f"expected e<embedding dim>{EMBED_SEPARATOR} followed by the layers joined by {LAYER_SEPARATOR!r}"
            )
        embed_dim = _parse_number(embed_text[1:], int, "embedding dimension", "embedding")
        tokens = layers_text.split(LAYER_SEPARATOR)
        return AutoFormerArch(embed_dim, tuple(_parse_layer(token, index) for index, token in enumerate(tokens)))
    except InvalidArchitectureError as error:
        raise InvalidArchitectureError(f"invalid AutoFormer architecture {stripped!r}: {error}; example: {_EXAMPLE}") from None


def validate_arch(arch: AutoFormerArch, choices: AutoFormerChoices, space_name: str) -> None:
    """Raise InvalidArchitectureError naming the first value that `choices` does not allow, and what it allows."""
    prefix = f"not an architecture of {space_name}"
    if arch.embed_dim not in choices.embed_dims:
        raise InvalidArchitectureError(
            f"{prefix}: embedding dimension {arch.embed_dim} is not allowed; allowed: {_join(choices.embed_dims)}"
        )
    if arch.depth not in choices.depths:
        raise InvalidArchitectureError(
            f"{prefix}: it has {arch.depth} layers; allowed depths: {_join(choices.depths)}"
        )
    for index, (heads, ratio) in enumerate(arch.layers):
        if heads not in choices.heads:
            raise InvalidArchitectureError(
                f"{prefix}: layer {index + 1} has {heads} heads; allowed heads: {_join(choices.heads)}"
            )
        if ratio not in choices.mlp_ratios:
            raise InvalidArchitectureError(
                f"{prefix}: layer {index + 1} has MLP ratio {ratio}; allowed MLP ratios: {_join(choices.mlp_ratios)}"
            )


def sample_arch(choices: AutoFormerChoices, rng: random.Random) -> AutoFormerArch:
    """Draw the embedding dimension, the depth, then each layer's heads and MLP ratio, uniformly and independently."""
    embed_dim = rng.choice(choices.embed_dims)
    depth = rng.choice(choices.depths)
    layers = tuple((rng.choice(choices.heads), rng.choice(choices.mlp_ratios)) for _ in range(depth))
    return AutoFormerArch(embed_dim, layers)


def mutate_arch(arch: AutoFormerArch, choices: AutoFormerChoices, rng: random.Random) -> AutoFormerArch:
    """Change one choice, drawn uniformly from the embedding dimension, the depth and every layer's heads and ratio.

    The new value differs from the old one. A deeper network gets new trailing layers with
    random choices. A shallower one drops its trailing layers.
    """
    genes: List[Tuple[str, int]] = [("embed", -1), ("depth", -1)]
    for index in range(arch.depth):
        genes.append(("heads", index))
        genes.append(("ratio", index))
    kind, index = rng.choice(genes)
    embed_dim = arch.embed_dim
    layers = list(arch.layers)
    if kind == "embed":
        embed_dim = rng.choice([e for e in choices.embed_dims if e != embed_dim])
    elif kind == "depth":
        depth = rng.choice([d for d in choices.depths if d != arch.depth])
        while len(layers) < depth:
            layers.append((rng.choice(choices.heads), rng.choice(choices.mlp_ratios)))
        del layers[depth:]
    elif kind == "heads":
        heads, ratio = layers[index]
        layers[index] = (rng.choice([h for h in choices.heads if h != heads]), ratio)
    else:
        heads, ratio = layers[index]
        layers[index] = (heads, rng.choice([r for r in choices.mlp_ratios if r != ratio]))
    return AutoFormerArch(embed_dim, tuple(layers))


def shrink_arch(arch: AutoFormerArch, choices: AutoFormerChoices, rng: random.Random) -> Optional[AutoFormerArch]:
    """Lower one choice by one step: the embedding dimension, the depth, or a layer's heads or ratio, drawn uniformly.

    Every step removes weights and multiply-adds, so repeated shrinking reaches the
    smallest architecture of `choices`. Returns None when `arch` already is the smallest.
    """
    genes: List[Tuple[str, int]] = []
    if arch.embed_dim > min(choices.embed_dims):
        genes.append(("embed", -1))
    if arch.depth > min(choices.depths):
        genes.append(("depth", -1))
    for index, (heads, ratio) in enumerate(arch.layers):
        if heads > min(choices.heads):
            genes.append(("heads", index))
        if ratio > min(choices.mlp_ratios):
            genes.append(("ratio", index))
    if not genes:
        return None
    kind, index = rng.choice(genes)
    embed_dim = arch.embed_dim
    layers = list(arch.layers)
    if kind == "embed":
        embed_dim = _lower(choices.embed_dims, embed_dim)
    elif kind == "depth":
        layers.pop()
    else:
        heads, ratio = layers[index]
        if kind == "heads":
            heads = _lower(choices.heads, heads)
        else:
            ratio = _lower(choices.mlp_ratios, ratio)
        layers[index] = (heads, ratio)
    return AutoFormerArch(embed_dim, tuple(layers))


def _lower(values: Sequence[Any], value: Any) -> Any:
    return values[values.index(value) - 1]


# --------------------------------------------------------------------------------------
# The fixed skeleton and the analytic cost.


@dataclass(frozen=True)
class AutoFormerConfig:
    """Fixed settings around the searched layers: input resolution and classes (patch size 16)."""

    input_size: int = 224
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.input_size < PATCH_SIZE or self.input_size % PATCH_SIZE:
            raise InvalidArchitectureError(
                f"input_size must be a positive multiple of the patch size {PATCH_SIZE}, got {self.input_size}"
            )
        if self.num_classes < 1:
            raise InvalidArchitectureError(f"num_classes must be at least 1, got {self.num_classes}")

    @property
    def num_patches(self) -> int:
        return (self.input_size // PATCH_SIZE) ** 2

    @property
    def num_tokens(self) -> int:
        """Patches plus the class token."""
        return self.num_patches + 1


def mlp_hidden_dim(embed_dim: int, ratio: float) -> int:
    """Return the MLP width: int(embed_dim * ratio), as AutoFormer rounds it."""
    return int(embed_dim * ratio)


def count_params(arch: AutoFormerArch, config: AutoFormerConfig = AutoFormerConfig()) -> int:
    embed = arch.embed_dim
    total = 3 * PATCH_SIZE * PATCH_SIZE * embed + embed  # patch-embedding convolution with bias
    total += embed + config.num_tokens * embed  # class token and position embedding
    for heads, ratio in arch.layers:
        qkv_dim = heads * HEAD_DIM
        hidden = mlp_hidden_dim(embed, ratio)
        total += 2 * embed  # LayerNorm before attention
        total += embed * 3 * qkv_dim + 3 * qkv_dim  # query, key and value projection with bias
        total += qkv_dim * embed + embed  # output projection
        total += 2 * embed  # LayerNorm before the MLP
        total += embed * hidden + hidden + hidden * embed + embed  # the two MLP layers
    total += 2 * embed  # final LayerNorm
    total += embed * config.num_classes + config.num_classes
    return total


def count_flops(arch: AutoFormerArch, config: AutoFormerConfig = AutoFormerConfig()) -> int:
    embed = arch.embed_dim
    tokens = config.num_tokens
    total = config.num_patches * 3 * PATCH_SIZE * PATCH_SIZE * embed
    for heads, ratio in arch.layers:
        qkv_dim = heads * HEAD_DIM
        hidden = mlp_hidden_dim(embed, ratio)
        total += tokens * (embed * 3 * qkv_dim + qkv_dim * embed + 2 * embed * hidden)
        total += 2 * tokens * tokens * qkv_dim  # Q K^T and attention x V, every head together
    total += embed * config.num_classes  # the head reads the class token only
    return total


def build_network(arch: AutoFormerArch, config: AutoFormerConfig = AutoFormerConfig()):
    """Build the standalone untrained network (imported lazily: it needs torch)."""
    from models.spaces._autoformer_net import AutoFormerNetwork

    return AutoFormerNetwork(arch, config, head_dim=HEAD_DIM, patch_size=PATCH_SIZE)


class AutoFormerSpace(SearchSpace):
    def __init__(self, variant: str, *, num_classes: int = 1000, input_size: int = 224) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown AutoFormer variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.name = f"autoformer-{variant}"
        self.choices = VARIANTS[variant]
        self.config = AutoFormerConfig(input_size=input_size, num_classes=num_classes)
        self.num_classes = num_classes
        self.input_size = input_size

    def parse(self, text: str) -> AutoFormerArch:
        return self.validate(parse_arch(text))

    def validate(self, arch: Any) -> AutoFormerArch:
        """Return `arch` when it is an architecture of this space; raise InvalidArchitectureError otherwise."""
        if isinstance(arch, str):
            return self.parse(arch)
        if not isinstance(arch, AutoFormerArch):
            raise InvalidArchitectureError(f"expected an AutoFormerArch, got {type(arch).__name__}")
        validate_arch(arch, self.choices, self.name)
        return arch

    def to_string(self, arch: AutoFormerArch) -> str:
        return self.validate(arch).to_string()

    def sample(self, rng: random.Random) -> AutoFormerArch:
        return sample_arch(self.choices, rng)

    def mutate(self, arch: AutoFormerArch, rng: random.Random) -> AutoFormerArch:
        return mutate_arch(self.validate(arch), self.choices, rng)

    def shrink(self, arch: AutoFormerArch, rng: random.Random) -> Optional[AutoFormerArch]:
        """Lower one choice by one step (see `shrink_arch`). Returns None for the smallest architecture."""
        return shrink_arch(self.validate(arch), self.choices, rng)

    def params(self, arch: AutoFormerArch) -> int:
        return count_params(self.validate(arch), self.config)

    def flops(self, arch: AutoFormerArch) -> int:
        return count_flops(self.validate(arch), self.config)

    def build(self, arch: AutoFormerArch):
        return build_network(self.validate(arch), self.config)

    def smallest_arch(self) -> AutoFormerArch:
        layer = (min(self.choices.heads), min(self.choices.mlp_ratios))
        return AutoFormerArch(min(self.choices.embed_dims), (layer,) * min(self.choices.depths))

    def largest_arch(self) -> AutoFormerArch:
        layer = (max(self.choices.heads), max(self.choices.mlp_ratios))
        return AutoFormerArch(max(self.choices.embed_dims), (layer,) * max(self.choices.depths))

    def cost_range(self) -> Dict[str, Tuple[int, int]]:
        """Return the smallest and largest params and FLOPs, reached at the uniform corner points.

        Every cost grows with each choice.
        """
        smallest, largest = self.smallest_arch(), self.largest_arch()
        return {
            "params": (count_params(smallest, self.config), count_params(largest, self.config)),
            "flops": (count_flops(smallest, self.config), count_flops(largest, self.config)),
        }

    def describe(self) -> Dict[str, Any]:
        description = super().describe()
        description.update(
            {
                "embed_dim_choices": list(self.choices.embed_dims),
                "heads_choices": list(self.choices.heads),
                "mlp_ratio_choices": list(self.choices.mlp_ratios),
                "depth_choices": list(self.choices.depths),
                "head_dim": HEAD_DIM,
                "patch_size": PATCH_SIZE,
                "flops_convention": "multiply-adds of the patch convolution, linear layers and attention matrix products",
            }
        )
        return description


def _register(variant: str) -> None:
    @register_space(f"autoformer-{variant}")
    def make_space(*, num_classes: int = 1000, input_size: int = 224) -> AutoFormerSpace:
        return AutoFormerSpace(variant, num_classes=num_classes, input_size=input_size)


for _variant in VARIANTS:
    _register(_variant)
