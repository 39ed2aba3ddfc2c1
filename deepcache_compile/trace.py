"""U-Net + one real call -> an exported graph with flat tensor inputs, one per input signature.

A diffusers U-Net is called with a mix of tensors, Python numbers, dicts (`added_cond_kwargs`) and lists
(ControlNet residuals). `CallFlattener` turns such a call into a flat tuple of tensors plus a hashable
signature (the pytree structure, every tensor's shape/dtype/device, and the non-tensor constants), and
`trace_unet` exports the U-Net for that signature with `torch.export`. The result is a `TracedUNet`: a
GraphModule whose placeholders are the flat tensors and whose output is `(sample,)`, holding the U-Net's own
parameter objects (nothing is copied).
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

__all__ = ["CallFlattener", "FlatCall", "TracedUNet", "UNetTraceError", "dynamic_dims", "trace_unet"]


class UNetTraceError(RuntimeError):
    """The U-Net could not be exported with torch.export."""


@dataclass(frozen=True)
class FlatCall:
    """One U-Net call, flattened: the tensors in order and what identifies their traced graph."""

    signature: Hashable
    tensors: tuple[torch.Tensor, ...]
    timestep: Any
    return_dict: bool


class CallFlattener:
    """Binds a call to the U-Net's forward signature and flattens it.

    The forward signature is read once; per call the cost is a bind and a pytree flatten (microseconds).
    `None` arguments are dropped, so passing `class_labels=None` and omitting it share one trace.
    Python-number timesteps become tensors, so they are graph inputs rather than baked-in constants.
    """

    def __init__(self, unet: nn.Module):
        self._signature = inspect.signature(unet.forward)
        self._returns_dict = "return_dict" in self._signature.parameters

    def __call__(self, args: tuple, kwargs: dict) -> FlatCall:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{err}; the wrapped U-Net's forward signature is {self._signature}") from None
        arguments = {k: v for k, v in bound.arguments.items() if v is not None}
        return_dict = bool(arguments.pop("return_dict", True)) and self._returns_dict
        timestep = arguments.get("timestep")
        if timestep is not None and not isinstance(timestep, torch.Tensor):
            arguments["timestep"] = torch.tensor(timestep, device=arguments["sample"].device)
        leaves, spec = pytree.tree_flatten(arguments)
        tensors, metas, constants = [], [], []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                tensors.append(leaf)
                metas.append((tuple(leaf.shape), leaf.dtype, leaf.device))
            else:
                constants.append((i, leaf))
        signature = (spec, tuple(metas), _hashable(constants))
        return FlatCall(signature, tuple(tensors), timestep, return_dict)

    def input_names(self, args: tuple, kwargs: dict) -> tuple[str, ...]:
        """Names of the flat tensors, e.g. `("sample", "timestep", "added_cond_kwargs.text_embeds")`."""
        bound = self._signature.bind(*args, **kwargs)
        arguments = {k: v for k, v in bound.arguments.items() if v is not None and k != "return_dict"}
        if "timestep" in arguments and not isinstance(arguments["timestep"], torch.Tensor):
            arguments["timestep"] = torch.tensor(arguments["timestep"])
        with_paths, _ = pytree.tree_flatten_with_path(arguments)
        return tuple(
            ".".join(_key_name(k) for k in path) for path, leaf in with_paths if isinstance(leaf, torch.Tensor)
        )


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _hashable(constants: list) -> tuple:
    try:
        hash(tuple(constants))
        return tuple(constants)
    except TypeError:
        return tuple((i, repr(v)) for i, v in constants)


class _FlatUNet(nn.Module):
    """The module that torch.export sees: flat tensors in, the output sample tensor out."""

    def __init__(self, unet: nn.Module, spec: pytree.TreeSpec, n_leaves: int, constants: tuple):
        super().__init__()
        self.unet = unet
        self._spec, self._n_leaves, self._constants = spec, n_leaves, dict(constants)
        self._has_return_dict = "return_dict" in inspect.signature(unet.forward).parameters

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor]:
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
        input_names: one name per placeholder, e.g. `("sample", "timestep", "encoder_hidden_states")`.
        call: the flattened call it was traced with.
    """

    gm: fx.GraphModule
    input_names: tuple[str, ...]
    call: FlatCall

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.call.tensors


def dynamic_dims(tensors: tuple[torch.Tensor, ...], batch: tuple[int, int], height: tuple[int, int],
                 width: tuple[int, int], multiple: int) -> tuple[dict[int, Any] | None, ...]:
    """`torch.export` dynamic shapes for a flat call (and, appended by the caller, a cache tensor).

    Every tensor with the sample's batch gets the `batch` dimension; every rank>=4 tensor gets spatial
    dimensions that are integer multiples of one base height and width symbol, `multiple` sample pixels each,
    so ControlNet residuals and caches at 1/2, 1/4, ... of the sample's size stay tied to it.
    """
    sample = tensors[0]
    b = torch.export.Dim("batch", min=batch[0], max=batch[1])
    h = torch.export.Dim("height", min=height[0] // multiple, max=height[1] // multiple)
    w = torch.export.Dim("width", min=width[0] // multiple, max=width[1] // multiple)
    dims = []
    for t in tensors:
        spec: dict[int, Any] = {}
        if t.dim() >= 1 and t.shape[0] == sample.shape[0]:
            spec[0] = b
        if t.dim() >= 4:
            spec[t.dim() - 2] = h * (t.shape[-2] * multiple // sample.shape[-2])
            spec[t.dim() - 1] = w * (t.shape[-1] * multiple // sample.shape[-1])
        dims.append(spec or None)
    return tuple(dims)


def trace_unet(unet: nn.Module, call: FlatCall, input_names: tuple[str, ...], dynamic_shapes: tuple | None = None,
               ) -> TracedUNet:
    """Exports `unet` for the signature of `call`: static shapes, or symbolic ones given `dynamic_shapes`
    (see `dynamic_dims`).

    Example:
        >>> flat = CallFlattener(unet)
        >>> args, kwargs = (sample, 10), {"encoder_hidden_states": text}
        >>> traced = trace_unet(unet, flat(args, kwargs), flat.input_names(args, kwargs))
        >>> traced.gm(*traced.example_inputs)[0].shape == sample.shape
        True
    """
    spec, _, constants = call.signature
    wrapper = _FlatUNet(unet, spec, spec.num_leaves, constants)
    was_training = unet.training
    unet.eval()
    try:
        ep = export_program(wrapper, call.tensors, (dynamic_shapes,) if dynamic_shapes else None)
    except Exception as err:  # torch.export raises many types; all mean the same to the user
        raise UNetTraceError(_explain_export_failure(err)) from err
    finally:
        unet.train(was_training)
    gm = _positional(ep.module())
    logger.info("traced %s: %d nodes, inputs %s", type(unet).__name__, len(gm.graph.nodes), input_names)
    return TracedUNet(gm=gm, input_names=input_names, call=call)


def export_program(module: nn.Module, inputs: tuple, dynamic_shapes: tuple | None = None):
    """`torch.export.export` (non-strict). With dynamic shapes, sizes 1 stay symbolic (`backed_size_oblivious`),
    so one program serves batch 1 and batch 2 (CFG) alike."""
    if dynamic_shapes is None:
        return torch.export.export(module, inputs, strict=False)
    from torch.fx.experimental import _config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)


def _positional(gm: fx.GraphModule) -> fx.GraphModule:
    """Drops the exported module's pytree calling convention and its input guards: plain `(*tensors)`."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph._codegen = fx.graph.CodeGen()
    gm.graph.lint()
    gm.recompile()
    return gm


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
