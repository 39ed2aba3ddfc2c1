"""U-Net + one flattened call -> an exported graph with flat tensor inputs, one per input signature.

`trace_unet` exports the U-Net for the signature of a `FlatCall` (see `calls.py`) with `torch.export`. The
result is a `TracedUNet`: a GraphModule whose placeholders are the flat tensors and whose output is
`(sample,)`, holding the U-Net's own parameter objects (nothing is copied).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.experimental import proxy_tensor
from torch.utils import _pytree as pytree

from ..calls import FlatCall
from ..shapes import ShapeRanges, TracedSizes, is_batched
from ..tracing import GATE

logger = logging.getLogger(__name__)

__all__ = ["TracedUNet", "UNetTraceError", "export_program", "forget_last_trace", "trace_unet"]


def forget_last_trace() -> None:
    """Drops torch's record of the last make_fx trace: a module global mapping fake tensors to the trace's nodes,
    kept for export's leak detection and replaced only by the next trace. After AOTInductor's freezing that
    graph holds the U-Net's tensors and the constants folded from them (SD 1.5: 3.4 GB more, measured with
    `bench/weights_memory.py`) until some later trace. The graph sits in a reference cycle: collect after."""
    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


class UNetTraceError(RuntimeError):
    """The U-Net could not be exported with torch.export."""


class _FlatUNet(nn.Module):
    """The module that torch.export sees: flat tensors in, the output sample tensor out."""

    def __init__(self, unet: nn.Module, spec: pytree.TreeSpec, n_leaves: int, constants: tuple,
                 batched: tuple[int, ...] = ()):
        super().__init__()
        self.unet = unet
        self._spec, self._n_leaves, self._constants = spec, n_leaves, dict(constants)
        self._has_return_dict = "return_dict" in inspect.signature(unet.forward).parameters
        self._batched = batched  # inputs whose first dimension is the sample's batch (dynamic traces)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor]:
        for i in self._batched:  # one batch symbol for all: export gives each input its own, equated only where an
            torch._check(tensors[i].shape[0] == tensors[0].shape[0])  # op meets both (a text mask may never)
        it = iter(tensors)
        leaves = [self._constants[i] if i in self._constants else next(it) for i in range(self._n_leaves)]
        kwargs = pytree.tree_unflatten(leaves, self._spec)
        if self._has_return_dict:
            kwargs["return_dict"] = False
        out = self.unet(**kwargs)
        return (out[0] if isinstance(out, (tuple, list)) else out.sample,)


@dataclass(frozen=True)
class TracedUNet:
    """An exported U-Net for one input signature.

    Attributes:
        gm: positional GraphModule `(*inputs) -> (sample,)`; its parameters are the U-Net's own objects.
        call: the flattened call it was traced with (`call.names` names the placeholders).
    """

    gm: fx.GraphModule
    call: FlatCall

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.call.names

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.call.tensors


def trace_unet(unet: nn.Module, call: FlatCall, ranges: ShapeRanges | None = None) -> TracedUNet:
    """Exports `unet` for the signature of `call`: static shapes, or symbolic ones serving every shape in
    `ranges`.

    Example:
        >>> call = CallFlattener(unet)((sample, 10), {"encoder_hidden_states": text})
        >>> traced = trace_unet(unet, call)
        >>> traced.gm(*traced.example_inputs)[0].shape == sample.shape
        True
    """
    batched = () if ranges is None else tuple(
        i for i, t in enumerate(call.tensors) if i > 0 and is_batched(t, call.tensors[0]))
    wrapper = _FlatUNet(unet, call.spec, call.spec.num_leaves, call.constants, batched)
    was_training = unet.training
    unet.eval()
    try:
        with _position_tables_from_size(unet, ranges):
            ep = export_program(wrapper, call.tensors, ranges, variadic=True)
    except Exception as err:  # torch.export raises many types; all mean the same to the user
        raise UNetTraceError(_explain_export_failure(err)) from err
    finally:
        unet.train(was_training)
    gm = _positional(_functional(ep).module())
    logger.info("traced %s: %d nodes, inputs %s", type(unet).__name__, len(gm.graph.nodes), call.names)
    if ranges is not None:
        _check_another_size(wrapper, gm, call, ranges)
    return TracedUNet(gm=gm, call=call)


def _check_another_size(model: nn.Module, gm: fx.GraphModule, call: FlatCall, ranges: ShapeRanges) -> None:
    """Runs a trace over a range of sizes once at another size, against the model: torch.export keeps a size
    that Python code turned into a constant without saying so (DiT's output takes the square root of the token
    count and serves square samples only), and such a graph would fail or be wrong at other sizes.

    The size: the smallest height, and the width one multiple above the smallest where the range allows (a
    non-square sample). Costs one small eager call of each, once per trace."""
    sample = call.tensors[0]
    height, width = ranges.height[0], min(ranges.width[0] + ranges.multiple, ranges.width[1])
    if (height, width) == tuple(sample.shape[-2:]):
        return
    shape = (*sample.shape[:-2], height, width)
    gen = torch.Generator(device=sample.device).manual_seed(0)
    inputs = []
    for t in call.tensors:
        new = ShapeRanges.shape_for(tuple(t.shape), tuple(sample.shape), shape)
        inputs.append(t if new == tuple(t.shape) else
                      torch.randn(new, generator=gen, device=t.device).to(t.dtype))
    with torch.no_grad():
        expected = model(*inputs)[0]
        try:
            actual = gm(*inputs)[0]
        except RuntimeError as err:
            actual = err
    if isinstance(actual, Exception) or actual.shape != expected.shape or not torch.allclose(
            actual, expected, rtol=1e-3, atol=1e-5):
        what = f"fails there ({str(actual).splitlines()[0]})" if isinstance(actual, Exception) else "differs there"
        raise UNetTraceError(
            f"{type(model.unet).__name__} traced over heights {ranges.height} and widths {ranges.width} {what} "
            f"at {height} x {width}: the model fixes a size in Python code that the trace kept as a constant "
            "(e.g. DiT's output reshapes by the square root of the token count: square samples only). Leave "
            "height/width out of the ranges (one resolution per pair) or give a range of one size")


@contextlib.contextmanager
def _position_tables_from_size(model: nn.Module, ranges: ShapeRanges | None):
    """Over a range of sizes, diffusers' `PatchEmbed` computes its sine-cosine position table from the size.

    It keeps the table of its configured size and compares the input's size with it in Python
    (`if self.height != height or self.width != width`), which a trace over a range turns into a guard: the
    program would serve the configured size only. For the trace its stored size is hidden, so the table is
    computed from the symbolic size (the function that made the stored table; equal values at that size)."""
    hidden = []
    if ranges is not None and (ranges.height[0] < ranges.height[1] or ranges.width[0] < ranges.width[1]):
        from diffusers.models.embeddings import PatchEmbed

        hidden = [m for m in model.modules() if isinstance(m, PatchEmbed) and m.pos_embed is not None
                  and not m.pos_embed_max_size]
    saved = [(m.height, m.width) for m in hidden]
    for m in hidden:
        m.height = m.width = None
    try:
        yield
    finally:
        for m, (height, width) in zip(hidden, saved):
            m.height, m.width = height, width


def export_program(module: nn.Module, inputs: tuple, ranges: ShapeRanges | None = None, variadic: bool = False):
    """`torch.export.export` (non-strict) of `module(*inputs)`, static or serving every shape in `ranges`
    (`variadic`: the module's forward takes `*tensors`, whose shapes torch.export wants as one entry). With ranges, sizes 1 stay symbolic
    (`backed_size_oblivious`), so one program serves batch 1 and batch 2 (CFG) alike."""
    with GATE.trace():  # export flips process-wide backend flags: no step may run meanwhile (see tracing.py)
        if ranges is None:
            return _untrack_fakes(torch.export.export(module, inputs, strict=False))
        dynamic_shapes = ranges.export_dims(inputs, TracedSizes.of(module, inputs))
        dynamic_shapes = (dynamic_shapes,) if variadic else dynamic_shapes
        from torch.fx.experimental import _config as fx_config

        with fx_config.patch(backed_size_oblivious=True):
            return _untrack_fakes(torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False))


def _functional(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without in-place ops (functionalized, no decomposition) where it has any: a cut decides
    from data flow, and a write into a buffer (Wan's rotary tables fill a tensor with `copy_`) is none."""
    if not any(_mutates(node) for node in ep.graph.nodes):
        return ep
    from torch.fx.experimental import _config as fx_config

    # As in export_program: a size-1 or equal pair of example sizes must not become a guard. Re-tracing a
    # view of a (2, h, w) grid as (2, 1, w, h) (diffusers' position tables) otherwise equates h and w.
    with GATE.trace(), fx_config.patch(backed_size_oblivious=True):
        return _untrack_fakes(ep.run_decompositions({}))


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _untrack_fakes(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drops the trace's `ShapeEnv.tracked_fakes` (read by dynamo's guard production only, never after export).

    They form a reference cycle that passes through C++ and that Python's garbage collector cannot see: fake
    tensor -> its C++ sizes (symbolic) -> SymNode -> ShapeEnv -> tracked_fakes -> fake tensor. Left in place,
    every trace's shape environment and fake tensors outlive its graphs: about 0.3 MB per trace of the digits
    U-Net, without bound in a server that compiles pair after pair."""
    for node in program.graph.nodes:
        mode = getattr(node.meta.get("val"), "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            mode.shape_env.tracked_fakes = None
            break
    return program


def _positional(gm: fx.GraphModule) -> fx.GraphModule:
    """Drops the exported module's pytree calling convention and its input guards: plain `(*tensors)`."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph._codegen = fx.graph.CodeGen()
    _drop_kept_squeezes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_kept_squeezes(gm: fx.GraphModule) -> None:
    """Removes `squeeze` calls that the trace found to keep every dimension (PixArt squeezes its token axis,
    which is never 1): over symbolic sizes the trace has already decided so, and ONNX's Squeeze, given the
    symbolic axis, would fail on every size but 1."""
    squeezes = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)
    for node in [n for target in squeezes for n in gm.graph.find_nodes(op="call_function", target=target)]:
        source = node.args[0]
        before, after = source.meta.get("val"), node.meta.get("val")
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() == after.dim():
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)


def _explain_export_failure(err: Exception) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    sources = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text) or re.findall(
        r"File: (\S+):(\d+) in (\w+)", text)
    user = [s for s in sources if "/torch/" not in s[0]]
    where = f"\nIt failed at {user[-1][0]}:{user[-1][1]} in {user[-1][2]}()." if user else ""
    return (
        f"torch.export could not trace this U-Net: {type(err).__name__}: {first}{where}\n"
        "DeepCache needs one static graph per input signature. Common causes and fixes: a custom attention "
        "processor with Python-side state (call unet.set_default_attn_processor()), data-dependent control "
        "flow on tensor values in a custom module (rewrite it with torch.where / torch.cond), or a third-party "
        "op without a fake-tensor kernel (register one with torch.library.register_fake)."
    )
