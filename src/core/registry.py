"""Component registry: classes and functions registered by name and built from config sections.

A registered class declares which constructor arguments are sub-components with ``__inject__``
(a list of argument names; the config gives either the name of a registered component, whose
top-level section supplies its arguments, or a dict with a ``type`` key plus arguments) and
which are taken from top-level config keys with ``__share__`` (e.g. ``num_classes``), and which
registered config sections it receives with ``__sections__`` (e.g. ``["dset"]``: the validated ``dset:``
settings, or None when that section is off).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Tuple

_REGISTRY: Dict[str, Any] = {}
_SECTIONS: Dict[str, Tuple[Callable, str]] = {}
_REQUIRES: Dict[str, Dict[str, str]] = {}


def register(name: str | None = None, force: bool = False) -> Callable:
    """Decorator: ``@register()`` registers under the object's ``__name__``."""

    def deco(obj):
        key = name or obj.__name__
        if key in _REGISTRY and not force and _REGISTRY[key] is not obj:
            raise ValueError(f"component name {key!r} registered twice "
                             f"({_REGISTRY[key]!r} and {obj!r}); pass a distinct name=")
        _REGISTRY[key] = obj
        return obj

    return deco


def register_section(name: str, validate: Callable, doc: str, requires: Dict[str, str] | None = None):
    """A top-level config section owned by a model family (e.g. ``dset``), validated by its owner.

    ``validate(section_or_None, where)`` returns the checked settings (or None when the feature is off) or
    raises ValueError; ``where(key)`` gives ``"<file>: <name>.<key>"`` (``key=None``: the section itself).
    The checked value is ``cfg.<name>`` and is passed to the components that declare ``<name>`` in their
    ``__sections__`` (and take it as a constructor argument of that name).
    ``requires``: top-level keys and the component each must name while the section is on (e.g.
    ``{"criterion": "DSETCriterion"}``: a DSET run whose loss left out CASS would train silently without it).
    """
    if name in _SECTIONS and _SECTIONS[name][0] is not validate:
        raise ValueError(f"config section {name!r} registered twice")
    _SECTIONS[name] = (validate, doc)
    _REQUIRES[name] = dict(requires or {})


def section_requirements(name: str) -> Dict[str, str]:
    """The top-level keys a registered section needs while it is on: key -> component name."""
    return dict(_REQUIRES.get(name, {}))


def sections() -> Dict[str, Tuple[Callable, str]]:
    """Registered top-level sections: name -> (validate, one-line doc)."""
    return dict(_SECTIONS)


def get(name: str):
    if name not in _REGISTRY:
        raise KeyError(f"unknown component {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_names():
    return sorted(_REGISTRY)


def constructor_params(obj) -> Dict[str, inspect.Parameter]:
    """Keyword parameters accepted by a registered class or function (self and *args excluded). A subclass
    whose ``__init__`` passes ``**kwargs`` on (e.g. DSETHybridEncoder) also accepts its parents' parameters."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    out = {k: p for k, p in params.items()
           if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    if inspect.isclass(obj) and any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for base in obj.__mro__[1:]:
            if "__init__" in vars(base) and base is not object:
                return {**constructor_params(base), **out}
    return out


def build(spec: dict, where: str = "config", **extra):
    """Build a registered component from ``{'type': Name, **kwargs}``.

    Unknown keyword names are an error that names ``where`` (file / key path), the bad key
    and the valid keys. ``extra`` are keyword arguments supplied by the caller (not from YAML).
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{where}: expected a mapping with a 'type' key naming a registered "
                         f"component, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    obj = get(spec["type"])
    params = constructor_params(obj)
    has_var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD
                     for p in inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters.values())
    unknown = [k for k in kwargs if k not in params]
    if unknown and not has_var_kw:
        raise KeyError(f"{where}: unknown key(s) {unknown} for {spec['type']}; "
                       f"valid keys: {', '.join(sorted(params))}")
    kwargs.update(extra)
    return obj(**kwargs)
