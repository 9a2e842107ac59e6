"""Backbone registry: a name -> constructor table.

Every constructor has the signature ``(num_classes: int, in_channels: int = 3, **specific)``
where each backbone-specific keyword has a default. :func:`build_backbone` validates the
name and the keywords against that signature (via :mod:`inspect`) so that a typo in a config
file becomes one readable :class:`~ltq.errors.ConfigError` instead of a ``TypeError`` deep in
a constructor.

Conventions every registered model follows (the quantization policies rely on them):

* ``forward(x) -> logits`` of shape ``(N, num_classes)``;
* the first ``nn.Conv2d`` in ``model.modules()`` order is the stem (the first layer applied
  to the image), and the last ``nn.Conv2d``/``nn.Linear`` in module order is the classifier;
* non-linearities are ``nn.ReLU`` (or ``nn.ReLU6``) modules and residual additions are plain
  ``out + identity``, so a module swap of Conv2d/Linear layers is enough to quantize a model.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from ltq.errors import ConfigError

__all__ = [
    "register_backbone",
    "build_backbone",
    "available_backbones",
    "backbone_options",
    "num_parameters",
    "check_option",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: positional parameters shared by every constructor (not "specific" options)
_COMMON = ("num_classes", "in_channels")


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn`` under ``name``.

    ``fn`` must accept ``(num_classes, in_channels=3, **specific kwargs with defaults)``.
    Registering the same name twice is a programming error and raises ``ValueError``.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"backbone {name!r} is already registered")
        params = list(inspect.signature(fn).parameters)
        if params[:2] != list(_COMMON):
            raise ValueError(f"backbone {name!r}: constructor must start with (num_classes, in_channels), got {params}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _ensure_loaded() -> None:
    # Importing the package registers every built-in backbone (its __init__ imports all modules).
    import ltq.models  # noqa: F401


def available_backbones() -> list[str]:
    """Sorted list of registered backbone names."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def _lookup(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.backbone={name!r} is not supported; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def backbone_options(name: str) -> dict[str, object]:
    """Backbone-specific keyword arguments of ``name`` and their defaults."""
    fn = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name not in _COMMON and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build_backbone(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered backbone ``name``.

    Raises :class:`~ltq.errors.ConfigError` for an unknown name, an unknown keyword argument
    or a non-positive ``num_classes``/``in_channels``.
    """
    fn = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model.num_classes={num_classes!r} is not supported; allowed: an integer >= 1")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"model.in_channels={in_channels!r} is not supported; allowed: an integer >= 1")
    sig = inspect.signature(fn)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = list(backbone_options(name))
        for key in kwargs:
            if key not in accepted:
                raise ConfigError(
                    f"model.backbone={name!r} has no option {key!r}; accepted: "
                    f"{', '.join(accepted) if accepted else '(none)'}"
                )
    return fn(num_classes, in_channels, **kwargs)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_option(backbone: str, option: str, value, allowed) -> None:
    """Raise ConfigError unless ``value`` is in ``allowed`` (for a backbone-specific option)."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(
            f"model.backbone={backbone!r} option {option}={value!r} is not supported; "
            f"allowed: {', '.join(map(str, allowed))}"
        )
