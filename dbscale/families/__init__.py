"""The registry of model families: the only place that maps a family's name (model.family) to its code.

    from dbscale import families
    family = families.get(run.config.model.family)      # a dbscale.families.base.Family
    model = family.build(family.job(run, block))

Built in: 'llama', 'masked', 'huginn'. Another family registers itself with `register(MyFamily())` when its
module is imported (docs/adding_a_family.md); `DBSCALE_FAMILIES=package.module[,other.module]` makes every
dbscale process (the launchers included) import such modules first.
"""

from __future__ import annotations

import importlib
import os

from dbscale.families.base import Family, Job, StepInfo, derive_seed

__all__ = [
    "Family",
    "Job",
    "StepInfo",
    "check",
    "config_from_dict",
    "derive_seed",
    "frozen_config_from_dict",
    "get",
    "layer_allocation",
    "load_config",
    "names",
    "register",
    "sections",
]

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` available under `family.name` (a second family of the same name is an error)."""
    if not family.name:
        raise ValueError(f"{type(family).__name__}: a family needs a name")
    known = _REGISTRY.get(family.name)
    if known is not None and type(known) is not type(family):
        raise ValueError(f"family '{family.name}' is registered already ({type(known).__name__})")
    _REGISTRY[family.name] = family
    return family


def _load() -> None:
    if _REGISTRY.get("llama") is None:
        from dbscale.families.huginn import HuginnFamily
        from dbscale.families.llama import LlamaFamily
        from dbscale.families.masked import MaskedFamily

        for family in (LlamaFamily(), MaskedFamily(), HuginnFamily()):
            register(family)
    for module in filter(None, os.environ.get("DBSCALE_FAMILIES", "").split(",")):
        importlib.import_module(module.strip())


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> Family:
    """The family registered as `name`; a KeyError that lists the known ones otherwise."""
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model family '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def check(cfg, fail) -> None:
    """The rules of the config's family (fail(key, message) raises the ConfigError), after dbscale.config's own."""
    try:
        family = get(cfg.model.family)
    except KeyError as e:
        fail(
            "model.family",
            f"{e.args[0]}. Fix: choose one of them, or import the module that registers yours "
            "(DBSCALE_FAMILIES=package.module).",
        )
    family.validate(cfg, fail)


def layer_allocation(cfg) -> list[int]:
    """Layers owned by each block, block 0 first, as the config's family decides (a Huginn block, say, is a
    whole prelude + core + coda)."""
    return get(cfg.model.family).layer_allocation(cfg)


# The config loaders of dbscale.config, with the family's rules: what every caller that loads a run's config uses.


def sections() -> dict[str, type]:
    """Each registered family's own config section (`model.<family>:`), for the loaders of dbscale.config."""
    _load()
    return {name: f.config_section for name, f in sorted(_REGISTRY.items()) if f.config_section is not None}


def config_from_dict(data, where: str = "<config>"):
    from dbscale import config

    return config.config_from_dict(data, where, check, sections())


def frozen_config_from_dict(data, where: str = "<run config>"):
    from dbscale import config

    return config.frozen_config_from_dict(data, where, check, sections())


def load_config(path, overrides=None):
    from dbscale import config

    return config.load_config(path, overrides, check, sections())
