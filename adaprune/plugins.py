"""The one plugin manager: estimators, fusion policies, allocations and model families.

Built-ins are registered as plugins exactly as third-party packages are (the same hooks, see
`adaprune.hookspecs`); installed packages come in through the entry-point groups. Each registry
below answers "which classes are there, by name" from the hooks, latest-registered first.
"""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from typing import Any, TypeVar

import pluggy
from torch import nn

from . import hookspecs, specs
from .allocation import ranked, uniform
from .allocation.base import Allocator
from .errors import ConfigurationError, EstimatorError, UnsupportedArchitectureError
from .estimators import activation, fluctuation, learned, magnitude, taylor
from .estimators.base import NEEDS, Estimator
from .fusion import fixed
from .fusion.adaptive import policy as adaptive
from .fusion.base import FusionPolicy
from .hookspecs import ENTRY_POINT_GROUPS, PROJECT, hookimpl
from .specs.base import ArchSpec
from .units.table import UnitTable

BUILTINS = (magnitude, taylor, activation, fluctuation, learned, fixed, adaptive, uniform, ranked, specs)
T = TypeVar("T")


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager holding the built-ins and every installed plugin (created once)."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    for module in BUILTINS:
        manager.register(module)
    manager.register(_Detection(), name="adaprune-detection")
    _load_entry_points(manager)
    return manager


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    """Register every installed plugin of the four groups, each plugin object once.

    (pluggy's `load_setuptools_entrypoints` refuses a module that a package names in two groups.)
    """
    for group in ENTRY_POINT_GROUPS:
        for entry_point in importlib.metadata.entry_points(group=group):
            if manager.get_plugin(entry_point.name) is not None or manager.is_blocked(entry_point.name):
                continue
            plugin = entry_point.load()
            if not manager.is_registered(plugin):
                manager.register(plugin, name=entry_point.name)


class _Detection:
    """The default spec detection: the first registered spec whose `matches(model)` holds."""

    @hookimpl(trylast=True)
    def adaprune_detect_spec(self, model: nn.Module, specs: list[type[ArchSpec]]) -> ArchSpec | None:
        return next((spec() for spec in specs if spec.matches(model)), None)


def _providers(hook: str) -> dict[str, tuple[type, str]]:
    """Each name a hook provides -> (its class, the plugin providing it); the latest-registered plugin wins."""
    providers: dict[str, tuple[type, str]] = {}
    for impl in reversed(getattr(plugin_manager().hook, hook).get_hookimpls()):
        for cls in impl.function():
            providers.setdefault(cls.name, (cls, impl.plugin_name))
    return providers


def estimator_classes() -> dict[str, type[Estimator]]:
    return {name: cls for name, (cls, _) in _providers("adaprune_estimators").items()}


def fusion_policy_classes() -> dict[str, type[FusionPolicy]]:
    return {name: cls for name, (cls, _) in _providers("adaprune_fusion_policies").items()}


def allocator_classes() -> dict[str, type[Allocator]]:
    return {name: cls for name, (cls, _) in _providers("adaprune_allocations").items()}


def spec_classes() -> list[type[ArchSpec]]:
    """Every registered family spec, latest-registered first."""
    return [cls for impl in reversed(plugin_manager().hook.adaprune_specs.get_hookimpls()) for cls in impl.function()]


def list_estimators() -> list[str]:
    """Names of all registered estimators, built-in and third-party."""
    return sorted(estimator_classes())


def _create(kind: str, classes: dict[str, type[T]], name: str, options: dict[str, Any], error: type[Exception],
            group: str) -> T:
    if name not in classes:
        raise error(f"Unknown {kind} {name!r}. Available: {', '.join(sorted(classes))}. Third-party ones "
                    f"register through the {group!r} entry-point group.")
    try:
        return classes[name](**options)
    except (TypeError, ValueError) as failure:
        if isinstance(failure, error):
            raise
        raise error(f"The {kind} {name!r} refused its options {options}: {failure}") from failure


def create_estimator(name: str, **options: Any) -> Estimator:
    """An estimator instance by name; an unknown name lists the available ones."""
    return _create("estimator", estimator_classes(), name, options, EstimatorError, "adaprune.estimators")


def create_policy(name: str, **options: Any) -> FusionPolicy:
    """A fusion policy instance by name; an unknown name lists the available ones."""
    return _create("fusion policy", fusion_policy_classes(), name, options, ConfigurationError,
                   "adaprune.fusion_policies")


def create_allocator(name: str, **options: Any) -> Allocator:
    """An allocation instance by name; an unknown name lists the available ones."""
    return _create("allocation", allocator_classes(), name, options, ConfigurationError, "adaprune.allocations")


def describe(estimator: Estimator) -> str:
    """How errors name an estimator: its name and the plugin (or else the module) that provides it."""
    plugins = [plugin for cls, plugin in _providers("adaprune_estimators").values() if cls is type(estimator)]
    source = f"plugin {plugins[0]!r}" if plugins else f"module {type(estimator).__module__}"
    return f"{estimator.name!r} ({source})"


def parse_estimator(spec: str | dict | Estimator) -> Estimator:
    """Accept a name ("taylor"), a name with options ({"name": "taylor", "order": 2}) or an instance."""
    if isinstance(spec, Estimator):
        estimator = spec
    elif isinstance(spec, str):
        estimator = create_estimator(spec)
    elif isinstance(spec, dict) and "name" in spec:
        estimator = create_estimator(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    else:
        raise EstimatorError(f"Cannot read estimator {spec!r}: give a name, a dict with 'name' and options, "
                             "or an Estimator instance.")
    unknown = set(estimator.needs) - NEEDS
    if unknown:
        raise EstimatorError(f"Estimator {describe(estimator)} needs {sorted(unknown)}, which the calibration pass "
                             f"cannot provide; it can ask for {sorted(NEEDS)}.")
    if estimator.compensates_bias and "activations" not in estimator.needs:
        raise EstimatorError(f"Estimator {describe(estimator)} compensates biases, which needs 'activations'.")
    return estimator


def detect_spec(model: nn.Module) -> ArchSpec:
    """The spec that describes `model`, found by the plugins from its config and module structure."""
    specs_ = spec_classes()
    spec = plugin_manager().hook.adaprune_detect_spec(model=model, specs=specs_)
    if spec is not None:
        return spec
    config = getattr(model, "config", None)
    raise UnsupportedArchitectureError(
        f"adaprune has no architecture spec for {type(model).__name__} "
        f"(model_type={getattr(config, 'model_type', None)!r}). Supported families: "
        f"{', '.join(dict.fromkeys(s.name for s in specs_))}. To add one, write a small ArchSpec subclass and "
        "register it through the 'adaprune.specs' entry-point group (or adaprune.specs.register_spec in a "
        "script): see docs/adding-a-family.md.")


def unit_table(model: nn.Module) -> UnitTable:
    """The ownership table of `model`'s units, its family detected by the plugins."""
    return UnitTable(model, detect_spec(model))
