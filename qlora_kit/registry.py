"""The registries ``quantize()`` reads, one per axis, keyed by type (torchao's ``quantize_`` shape).

- Quantize handlers, keyed by config type: ``@register_quantize_handler(GPTQConfig)`` makes
  ``quantize(model, GPTQConfig(...))`` call the decorated function. Every weight-format config (a subclass of
  :class:`~qlora_kit.configs.WeightConfig`) shares one handler, the round-to-nearest swap in ``api.py``.
- Weight formats, keyed by name and by config type: ``@register_format`` on a format class (one file in
  ``qlora_kit/formats/``) records it under its ``name`` and for each config class in its ``configs``.
  The recipe schema, the CLI choices, serialization and the benchmarks read :func:`format_names`.

A handler has the signature ``handler(model, config, *, filter_fn, device, calib_data) -> model``.

Example:
    >>> @register_quantize_handler(MyConfig)
    ... def _quantize_my(model, config, *, filter_fn=None, device=None, calib_data=None):
    ...     ...
    ...     return model
"""

from __future__ import annotations

from collections.abc import Callable

QuantizeHandler = Callable[..., object]

_HANDLERS: dict[type, QuantizeHandler] = {}
_FORMATS: dict[str, type] = {}  # name -> format class, in registration order
_FORMAT_OF_CONFIG: dict[type, type] = {}  # config class -> format class


def register_quantize_handler(config_cls: type) -> Callable[[QuantizeHandler], QuantizeHandler]:
    """Decorator: ``quantize(model, config)`` with a ``config_cls`` instance (or a subclass's) calls the function."""

    def decorate(handler: QuantizeHandler) -> QuantizeHandler:
        _HANDLERS[config_cls] = handler
        return handler

    return decorate


def quantize_handler(config) -> QuantizeHandler:
    """The handler registered for ``type(config)`` or its nearest registered base class.

    Raises:
        TypeError: nothing is registered for the config's type (the message lists what is).
    """
    _load_builtins()
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    known = ", ".join(sorted(c.__name__ for c in config_classes()))
    raise TypeError(f"quantize() got a {type(config).__name__}; pass one of the configs: {known}")


def register_format(cls: type) -> type:
    """Class decorator for a weight format: findable by ``cls.name`` and by each config class in ``cls.configs``."""
    _FORMATS[cls.name] = cls
    for config_cls in cls.configs:
        _FORMAT_OF_CONFIG[config_cls] = cls
    return cls


def format_names() -> tuple[str, ...]:
    """Names of every registered weight format in listing order (a format class's ``listing_order``, default
    100, then its name): "nf4", "fp4", "int8", "int4", "fp8", then formats added later."""
    _load_builtins()
    return tuple(sorted(_FORMATS, key=lambda n: (getattr(_FORMATS[n], "listing_order", 100), n)))


def get_format(name: str) -> type:
    """The format class registered as ``name``.

    Raises:
        ValueError: no such format (the message lists the known ones).
    """
    _load_builtins()
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown weight format {name!r}; known formats: {sorted(_FORMATS)}") from None


def format_for_config(config) -> type | None:
    """The format class a weight config (an instance or its class) produces; None for configs that are not
    weight formats (algorithm configs)."""
    _load_builtins()
    for cls in (config if isinstance(config, type) else type(config)).__mro__:
        if cls in _FORMAT_OF_CONFIG:
            return _FORMAT_OF_CONFIG[cls]
    return None


def weight_config_classes(*, weight_only: bool = False) -> tuple[type, ...]:
    """Every weight-format config class (with ``weight_only``: without the activation-quantizing ones)."""
    _load_builtins()
    classes = [c for name in format_names() for c in _FORMATS[name].configs]
    return tuple(c for c in classes if not (weight_only and getattr(c, "activation", None)))


def config_classes() -> tuple[type, ...]:
    """Every config class ``quantize`` accepts: weight-format configs, then algorithm configs."""
    _load_builtins()
    algorithms = [c for c in _HANDLERS if hasattr(c, "__dataclass_fields__")]  # not the WeightConfig base
    return tuple(dict.fromkeys([*weight_config_classes(), *algorithms]))


def config_class(name: str) -> type | None:
    """The registered config class called ``name`` (what saved files record), or None."""
    return next((c for c in config_classes() if c.__name__ == name), None)


def weight_config(format_name: str, **options):
    """The weight-only config of format ``format_name`` built from recipe / CLI knobs (``compute_dtype``,
    ``blocksize``, ``double_quant``, ``group_size``; each format takes the ones it has).

    Raises:
        ValueError: unknown format, or a knob out of range (the config's own message).
    """
    return get_format(format_name).config_from_options(**options)


def _load_builtins() -> None:
    """Import the built-in formats and algorithms once, so that their decorators have run."""
    from . import api, formats, ptq  # noqa: F401  (each registers on import)
