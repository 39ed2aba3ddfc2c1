"""`ShapeRanges`: the batch sizes and resolutions one traced graph serves, and the rule that ties every input's
shape to the sample's. Shared by dynamic compiled pairs (`compile_deepcache(..., dynamic=True)`), exports and
the engines that load them.

The rule: a tensor whose first dimension equals the sample's batch is batched; a tensor of rank >= 4 has
spatial dimensions that are fixed fractions (1, 1/2, 1/4, ...) of the sample's height and width (ControlNet
residuals, the cached feature). A sample of packed tokens, `(batch, tokens, channels)` (Flux), has its token
count where a 4-D sample has its height (`ShapeRanges.height` counts tokens, `multiple` 1), and so does the
first dimension of an unbatched 2-D tensor of that many rows (Flux's `img_ids`). Every other dimension (text
length, channels) is fixed by the example.

Where a graph traced over the ranges is at hand, its placeholders' symbolic sizes are the truth the rule
approximates, and they also cover what the rule cannot say: a transformer's cached residual has
`(height / patch) * (width / patch)` tokens, a product of two sizes (`TracedSizes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import sympy
import torch
from torch import fx

__all__ = ["ShapeRanges", "TracedSizes", "sample_size", "shape_class", "size_exprs", "with_batch"]


@dataclass(frozen=True)
class ShapeRanges:
    """What one graph accepts, in U-Net input pixels (latents for latent diffusion; x8 for SD's VAE).

    Attributes:
        batch: (min, max) batch size, counting the CFG doubling.
        height: (min, max) sample height; must be a multiple of `multiple`.
        width: (min, max) sample width; must be a multiple of `multiple`.
        multiple: the U-Net's total downsampling factor (8 for SD 1.x/2.x, 4 for SDXL).
    """

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int

    @classmethod
    def from_manifest(cls, ranges: dict) -> "ShapeRanges":
        return cls(tuple(ranges["batch"]), tuple(ranges["height"]), tuple(ranges["width"]), ranges["multiple"])

    @classmethod
    def resolve(cls, multiple: int, sample_size: int, batch: tuple[int, int] | None = None,
                height: tuple[int, int] | None = None, width: tuple[int, int] | None = None,
                what: str = "export") -> "ShapeRanges":
        """Ranges from the user's (min, max) pairs, validated; defaults: batch 1..16, height and width
        2*multiple .. max(2*sample_size, 8*multiple). `what` names the caller in error messages."""
        default = (2 * multiple, max(2 * sample_size, 8 * multiple))
        ranges = cls(tuple(batch or (1, 16)), tuple(height or default), tuple(width or default), multiple)
        for name, (lo, hi) in (("height", ranges.height), ("width", ranges.width)):
            if lo == hi and lo % multiple == 0 and lo >= multiple:
                continue  # one size: that dimension stays static (transformers, see runtime.pair.shape_ranges)
            if not (2 * multiple <= lo and hi // multiple > lo // multiple):
                raise ValueError(f"{what}: {name}=({lo}, {hi}) is not a usable range: it needs 2*{multiple} <= min "
                                 f"and at least two multiples of {multiple} (e.g. {name}=({2 * multiple}, "
                                 f"{8 * multiple}))")
        if not 1 <= ranges.batch[0] < ranges.batch[1]:
            raise ValueError(f"{what}: batch={ranges.batch} is not a usable range: use (min, max) with "
                             "1 <= min < max")
        return ranges

    def check(self, shape: tuple[int, ...], owner: str = "this export",
              fix: str = "export again with {what}=({lo}, {hi})") -> None:
        """Raises ValueError naming the dimension if a sample of `shape` is outside the ranges.

        `owner` names what has the ranges; `fix` says what to do about a value outside a range, and may use
        `{what}`, `{lo}` and `{hi}` (the range that would include the value)."""
        for what, value, (lo, hi) in (("batch", shape[0], self.batch), ("height", shape[-2], self.height),
                                      ("width", shape[-1], self.width)):
            if not lo <= value <= hi:
                hint = fix.format(what=what, lo=min(lo, value), hi=max(hi, value))
                raise ValueError(f"sample {what}={value} is outside {owner}'s range {lo}..{hi}: {hint}")
            if what != "batch" and value % self.multiple:
                raise ValueError(f"sample {what}={value} is not a multiple of {self.multiple}, which {owner} "
                                 f"needs (the U-Net downsamples by {self.multiple}): pad or resize the input")

    def export_dims(self, tensors: tuple[torch.Tensor, ...], traced: "TracedSizes | None" = None
                    ) -> tuple[dict[int, Any] | None, ...]:
        """`torch.export` dynamic shapes for a flat call whose first tensor is the sample (a cache tensor may
        be appended): the batch symbol on batched dimensions, spatial symbols `multiple` pixels each; given the
        sizes of a graph traced over the ranges, every other dimension symbolic there is `Dim.AUTO` (export
        derives it, e.g. a token count `h * w`)."""
        sample = tensors[0]
        b = torch.export.Dim("batch", min=self.batch[0], max=self.batch[1])
        h = torch.export.Dim("height", min=self.height[0] // self.multiple, max=self.height[1] // self.multiple) \
            if self.height[0] < self.height[1] else None
        w = torch.export.Dim("width", min=self.width[0] // self.multiple, max=self.width[1] // self.multiple) \
            if self.width[0] < self.width[1] else None
        dims = []
        for t in tensors:
            spec: dict[int, Any] = {}
            if is_batched(t, sample):
                spec[0] = b
            tokens = _token_axis(tuple(t.shape), tuple(sample.shape), t is sample)
            if tokens is not None and h is not None:
                spec[tokens] = h
            if t.dim() >= 4 and t.shape[-2] * self.multiple >= sample.shape[-2]:  # 1 x 1 (broadcast) stays 1
                if h is not None:  # a one-size range stays static
                    spec[t.dim() - 2] = h * (t.shape[-2] * self.multiple // sample.shape[-2])
                if w is not None:
                    spec[t.dim() - 1] = w * (t.shape[-1] * self.multiple // sample.shape[-1])
            dims.append(spec)
        if traced is not None:
            for spec, free in zip(dims, traced.symbolic_dims()):
                spec.update({d: torch.export.Dim.AUTO for d in free if d not in spec})
        return tuple(spec or None for spec in dims)

    def bounds(self, tensors: tuple[torch.Tensor, ...], traced: "TracedSizes | None" = None
               ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(smallest, largest) shape of each tensor over the ranges (the first tensor is the sample); given the
        sizes of a graph traced over the ranges, from those (every size grows with the sample's)."""
        example = tuple(tensors[0].shape)
        lo = (self.batch[0], *example[1:-2], self.height[0], self.width[0])
        hi = (self.batch[1], *example[1:-2], self.height[1], self.width[1])
        if traced is not None:
            return list(zip(traced.at(lo), traced.at(hi)))
        return [(self.shape_for(tuple(t.shape), example, lo), self.shape_for(tuple(t.shape), example, hi))
                for t in tensors]

    @staticmethod
    def shape_for(traced: tuple[int, ...], example_sample: tuple[int, ...], sample: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a tensor traced with shape `traced` beside `example_sample` takes beside a sample of shape
        `sample` (the rule in the module docstring)."""
        shape = list(traced)
        tokens = _token_axis(tuple(traced), tuple(example_sample), tuple(traced) == tuple(example_sample))
        if shape and shape[0] == example_sample[0]:
            shape[0] = sample[0]
        if tokens is not None:
            shape[tokens] = sample[1]
        if len(shape) >= 4:
            for d in (-2, -1):
                shape[d] = sample[d] * shape[d] // example_sample[d]
        return tuple(shape)


@dataclass(frozen=True)
class TracedSizes:
    """The input sizes of a graph traced over `ShapeRanges`, as torch.export left them in its placeholders'
    `meta["val"]`: ints, or sympy expressions in the trace's symbols (the first input is the sample; e.g.
    `(s0, 4, 2*s1, 2*s2)` and a transformer residual `(s0, s1*s2, 1152)`).

    Example:
        >>> sizes = TracedSizes.of(split.shallow)
        >>> sizes.at((2, 4, 24, 40))[-1]   # the cached residual beside a 24 x 40 sample, patch 2
        (2, 240, 1152)
    """

    shapes: tuple[tuple[Any, ...], ...]

    @classmethod
    def of(cls, module, inputs: tuple | None = None) -> "TracedSizes | None":
        """The sizes of a graph module's placeholders; None for another module, where a placeholder carries no
        traced tensor (not traced by export), or where `inputs` (the call it is for) has another count."""
        if not isinstance(module, fx.GraphModule):
            return None
        vals = [node.meta.get("val") for node in module.graph.find_nodes(op="placeholder")]
        if not all(isinstance(v, torch.Tensor) for v in vals) or (inputs is not None and len(inputs) != len(vals)):
            return None
        return cls(tuple(size_exprs(v.shape) for v in vals))

    def symbolic_dims(self) -> tuple[frozenset[int], ...]:
        """Per input, the dimensions whose size varies over the ranges."""
        return tuple(frozenset(d for d, s in enumerate(shape) if not _constant(s)) for shape in self.shapes)

    def at(self, sample: Sequence[int], others: dict | None = None) -> list[tuple[int, ...]]:
        """Every input's shape beside a sample of shape `sample`: the symbols solved from the sample's sizes
        (each a multiple of one symbol), the other sizes evaluated; `others` gives symbols the sample does not
        (e.g. one torch.export chose for a `Dim.AUTO` size, by its range's end)."""
        values = {symbol: sympy.Integer(v) for symbol, v in (others or {}).items()}
        values |= self._solve(self.shapes[0], [sympy.Integer(size) for size in sample])
        unsolved = {str(s) for shape in self.shapes for e in shape if not _constant(e)
                    for s in e.free_symbols} - {str(s) for s in values}
        if unsolved:
            raise ValueError(f"traced sizes {self.shapes} use symbols the sample's sizes do not give ({unsolved})")
        return [tuple(int(e) if _constant(e) else int(e.subs(values)) for e in shape) for shape in self.shapes]

    def describe(self, index: int) -> str:
        """Input `index`'s shape in words of the sample's (batch, height, width), e.g. `[batch, height*width/4,
        1152]` for a transformer residual beside a sample cut into 2 x 2 patches."""
        names = self._solve(self.shapes[0][:1] + self.shapes[0][-2:], sympy.symbols("batch height width"))
        sizes = (str(e if _constant(e) else sympy.simplify(e.subs(names))) for e in self.shapes[index])
        return "[" + ", ".join(sizes) + "]"

    @staticmethod
    def _solve(exprs: Sequence, sizes: Sequence) -> dict:
        """The symbol of each size expression that is a multiple of one symbol, as its size over that multiple
        (`2*s1` of size 24 -> {s1: 12}; sizes may be sympy symbols: `2*s1` of `height` -> {s1: height/2})."""
        values = {}
        for expr, size in zip(exprs, sizes):
            if not _constant(expr) and len(expr.free_symbols) == 1:
                (symbol,) = expr.free_symbols
                values[symbol] = size / (expr / symbol)
        return values


def size_exprs(shape) -> tuple:
    """A traced shape's sizes as ints or, where symbolic, their sympy expressions (comparing or converting the
    `SymInt`s themselves would guard the trace on the answer)."""
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in shape)


def _token_axis(shape: tuple[int, ...], sample: tuple[int, ...], is_sample: bool) -> int | None:
    """Beside a sample of packed tokens `(batch, tokens, channels)`: the dimension of a tensor of `shape` that is
    the token count (the sample's own second; the first of an unbatched 2-D tensor of as many rows, Flux's
    `img_ids`); None for other tensors and other samples."""
    if len(sample) != 3:
        return None
    if is_sample:
        return 1
    if len(shape) == 2 and shape[0] == sample[1] and shape[0] != sample[0]:
        return 0
    return None


def _constant(size) -> bool:
    return isinstance(size, int) or getattr(size, "is_number", False)


def is_batched(t: torch.Tensor, sample: torch.Tensor) -> bool:
    """Whether `t`'s first dimension is the call's batch: its size equals the sample's first (the module's rule)."""
    return t.dim() >= 1 and t.shape[0] == sample.shape[0]


def with_batch(tensors: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """The same call with `batch` rows (the first tensor is the sample): batched tensors are cut to their first
    rows or repeated row-wise, the others kept. For example inputs of another batch size."""
    sample = tensors[0]
    times = -(-batch // sample.shape[0])
    return tuple(t.repeat(times, *[1] * (t.dim() - 1))[:batch] if is_batched(t, sample) else t for t in tensors)


def sample_size(unet) -> int:
    """The U-Net's configured sample size (the larger side where it is a pair)."""
    size = unet.config.sample_size
    return size if isinstance(size, int) else max(size)


def shape_class(shapes: tuple[tuple[int, ...], ...]) -> tuple:
    """What calls served by one dynamic graph have in common (the first shape is the sample's): every dimension
    except the batch and the spatial sizes, which become markers ("batch", and fractions of the sample's size).

    Example:
        >>> shape_class(((2, 4, 64, 64), (2, 77, 768))) == shape_class(((1, 4, 32, 48), (1, 77, 768)))
        True
    """
    sample = shapes[0]
    key = []
    for i, shape in enumerate(shapes):
        dims: list = list(shape)
        tokens = _token_axis(tuple(shape), tuple(sample), i == 0)
        if dims and dims[0] == sample[0]:
            dims[0] = "batch"
        if tokens is not None:
            dims[tokens] = "tokens"
        if len(dims) >= 4:
            dims[-2], dims[-1] = Fraction(shape[-2], sample[-2]), Fraction(shape[-1], sample[-1])
        key.append(tuple(dims))
    return tuple(key)
