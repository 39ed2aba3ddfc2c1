"""A U-Net call -> a `FlatCall`: the tensors in order, their names, and the signature that picks a graph.

A diffusers U-Net is called with a mix of tensors, Python numbers, dicts (`added_cond_kwargs`) and lists
(ControlNet residuals). `CallFlattener` binds such a call to the forward signature and flattens it with
`torch.utils._pytree` into a flat tuple of tensors plus a hashable signature (the pytree structure, every
tensor's shape/dtype/device, and the non-tensor constants). Tracing, dispatch and export all start here.
`example_call` builds the call a pipeline would make, from the U-Net's own config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["CallFlattener", "FlatCall", "example_call"]


@dataclass(frozen=True)
class FlatCall:
    """One U-Net call, flattened.

    Attributes:
        signature: `(spec, tensor metas, constants)`; calls with equal signatures share one traced graph.
        tensors: the tensor leaves in pytree order.
        timestep: the timestep as passed (a number or a tensor), for generation tracking.
        return_dict: whether the caller wants the output dataclass.
    """

    signature: Hashable
    tensors: tuple[torch.Tensor, ...]
    timestep: Any
    return_dict: bool

    @property
    def spec(self) -> pytree.TreeSpec:
        return self.signature[0]

    @property
    def constants(self) -> tuple:
        return self.signature[2]

    def with_tensors(self, tensors: tuple[torch.Tensor, ...]) -> "FlatCall":
        """The same call with other tensors (same structure and constants): e.g. the example of another shape."""
        metas = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        return FlatCall((self.spec, metas, self.constants), tuple(tensors), self.timestep, self.return_dict)

    @property
    def names(self) -> tuple[str, ...]:
        """One name per tensor, e.g. `("sample", "timestep", "added_cond_kwargs.text_embeds")`.

        Derived from the signature's tree structure (only when tracing or exporting, never per step).
        """
        leaves = pytree.tree_unflatten(list(range(self.spec.num_leaves)), self.spec)
        constant_leaves = {i for i, _ in self.constants}
        with_paths, _ = pytree.tree_flatten_with_path(leaves)
        return tuple(".".join(_key_name(k) for k in path) for path, leaf in with_paths if leaf not in constant_leaves)


class CallFlattener:
    """Binds a call to the U-Net's forward signature and flattens it.

    The forward signature is read once; per call the cost is a bind and a pytree flatten (microseconds).
    `None` arguments are dropped, so passing `class_labels=None` and omitting it share one trace.
    Python-number timesteps become tensors, so they are graph inputs rather than baked-in constants.

    Example:
        >>> flat = CallFlattener(unet)((latents, 10), {"encoder_hidden_states": text})
        >>> flat.names
        ('sample', 'timestep', 'encoder_hidden_states')
    """

    def __init__(self, unet: nn.Module):
        self.forward_signature = inspect.signature(unet.forward)
        self._returns_dict = "return_dict" in self.forward_signature.parameters

    @property
    def parameters(self) -> tuple[str, ...]:
        """The forward parameter names, in order."""
        return tuple(self.forward_signature.parameters)

    def __call__(self, args: tuple, kwargs: dict) -> FlatCall:
        try:
            bound = self.forward_signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{err}; the wrapped U-Net's forward signature is {self.forward_signature}") from None
        arguments = {k: v for k, v in bound.arguments.items() if v is not None}
        return_dict = bool(arguments.pop("return_dict", True)) and self._returns_dict
        timestep = arguments.get("timestep")
        if timestep is not None and not isinstance(timestep, torch.Tensor):
            sample = arguments[next(iter(self.forward_signature.parameters))]  # U-Nets' sample, DiTs' hidden_states
            arguments["timestep"] = torch.tensor(timestep, device=sample.device)
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


def example_call(unet: nn.Module, batch: int = 1, height: int | None = None, width: int | None = None,
                 text_len: int = 77, seed: int = 0) -> dict:
    """Keyword arguments of one pipeline-like call of `unet`; `height`/`width` are in U-Net pixels (latents).

    Derived from the U-Net's config: text conditioning for cross-attention U-Nets, SDXL's `added_cond_kwargs`,
    class labels for class-conditional ones.

    Example:
        >>> sorted(example_call(sdxl_unet, height=32, width=32))
        ['added_cond_kwargs', 'encoder_hidden_states', 'sample', 'timestep']
    """
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    height, width = height or size, width or size
    param = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=param.device, dtype=param.dtype)

    kwargs = dict(sample=randn(batch, cfg.in_channels, height, width), timestep=torch.tensor(500))
    if getattr(cfg, "cross_attention_dim", None):
        kwargs["encoder_hidden_states"] = randn(batch, text_len, cfg.cross_attention_dim)
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        n_time = 6
        text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(batch, text_dim), time_ids=randn(batch, n_time))
    if getattr(cfg, "num_class_embeds", None):
        kwargs["class_labels"] = torch.arange(batch, device=param.device) % cfg.num_class_embeds
    return kwargs
