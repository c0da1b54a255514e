"""Export a moe_zoo model's own code next to its weights, so that it loads with ``trust_remote_code=True`` where
moe-zoo is not installed.

transformers' remote-code loader copies the module an ``auto_map`` entry names plus, recursively, the modules it
imports with a **single-dot** relative import (``from .x import y``), all into one flat folder; absolute imports
must name installed packages. moe_zoo's modules are nested (``moe_zoo.modeling.moe_llava.modeling_moe_llava``
imports ``...core.experts``), so the export walks the import graph from the model's classes, writes each moe_zoo
module it reaches as one flat file, and rewrites every moe_zoo import into the single-dot form. Names imported from
a package's ``__init__`` are traced to the module that defines them, so no ``__init__`` (and nothing it drags in,
such as the training code) is exported.

The configuration file gets a generated footer that registers the exported experts implementation and, for
nested moe_zoo models (a Metis-HOME over an upcycled MoE), their config and model classes with the Auto classes,
but only where no installed class is registered already: with moe_zoo imported, its installed classes win.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedConfig

from ..atomic_io import atomic_write_text

ROOT_PACKAGE = "moe_zoo"
GENERATED_HEADER = "# Exported by moe-zoo for loading with trust_remote_code=True; edit the moe_zoo sources instead.\n"
# Only ever imported where moe_zoo is installed (publishing hooks), never part of a model's code.
NOT_EXPORTED = (f"{ROOT_PACKAGE}.publishing",)
# Packages an exported module may import: what a plain transformers environment has.
ALLOWED_THIRD_PARTY = frozenset({"torch", "transformers", "numpy", "safetensors", "huggingface_hub", "tqdm", "regex"})


class RemoteCodeExportError(RuntimeError):
    """The model's code cannot be exported into a self-contained ``trust_remote_code`` folder."""


@dataclass
class _ModuleExport:
    name: str  # dotted moe_zoo module name
    source: str
    imports: list[tuple[ast.ImportFrom, dict[str, tuple[str, str]]]] = field(
        default_factory=list
    )  # alias -> (module, name)


def is_exportable(obj: object) -> bool:
    """Whether ``obj``'s class comes from the installed moe_zoo package (not from an already exported folder)."""
    return type(obj).__module__.startswith(ROOT_PACKAGE + ".")


def _is_internal(module: str) -> bool:
    return module == ROOT_PACKAGE or module.startswith(ROOT_PACKAGE + ".")


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    base = package_parts[: len(package_parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _defining_module(module: str, name: str, seen: frozenset[tuple[str, str]] = frozenset()) -> str:
    """The moe_zoo module whose source defines (or, for a non-package, holds) ``name`` as seen from ``module``."""
    if (module, name) in seen:
        raise RemoteCodeExportError(f"circular re-export of {name!r} through {module}")
    if importlib.util.find_spec(f"{module}.{name}") is not None if _is_package(module) else False:
        raise RemoteCodeExportError(
            f"`from {module} import {name}` imports a module; exported code must import names from modules "
            f"(write `from .{name} import ...`)"
        )
    if not _is_package(module):
        return module
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(node, module, is_package=True)
                    return _defining_module(source, alias.name, seen | {(module, name)})
    raise RemoteCodeExportError(f"cannot find where {module}.{name} is defined")


def _read_module(name: str) -> _ModuleExport:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RemoteCodeExportError(f"module {name} not found")
    source = Path(spec.origin).read_text(encoding="utf-8")
    export = _ModuleExport(name, source)
    tree = ast.parse(source)
    # Imports inside a try block are optional (the code handles their absence); transformers' check_imports does
    # not demand them of a downloading environment either.
    optional = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try) for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_is_internal(alias.name) for alias in node.names):
            raise RemoteCodeExportError(
                f"{name}: `import {node.names[0].name}` cannot be exported; use `from . import`"
            )
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _absolute(node, name, is_package=False)
        if not _is_internal(target) or target.startswith(NOT_EXPORTED):
            third_party = target.split(".")[0] not in ALLOWED_THIRD_PARTY and not _is_stdlib(target)
            if node.level == 0 and third_party and id(node) not in optional:
                raise RemoteCodeExportError(
                    f"{name} imports {target!r}, which a plain torch + transformers environment may lack"
                )
            continue
        export.imports.append(
            (node, {(a.asname or a.name): (_defining_module(target, a.name), a.name) for a in node.names})
        )
    return export


def _is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


def _flat_names(modules: Iterable[str]) -> dict[str, str]:
    """Each module's file name in the flat folder: its last name part, or more parts where two would collide."""
    modules = sorted(modules)
    names = {}
    for module in modules:
        parts = module.split(".")[1:]
        depth = 1
        while depth < len(parts) and sum(m.split(".")[-depth:] == parts[-depth:] for m in modules) > 1:
            depth += 1
        names[module] = "_".join(parts[-depth:])
    return names


def _rewrite(export: _ModuleExport, flat: dict[str, str]) -> str:
    lines = export.source.splitlines(keepends=True)
    # Replace from the bottom up so earlier line numbers stay valid.
    for node, aliases in sorted(export.imports, key=lambda item: -item[0].lineno):
        indent = " " * node.col_offset
        by_module: dict[str, list[str]] = {}
        for alias, (module, name) in aliases.items():
            by_module.setdefault(module, []).append(name if alias == name else f"{name} as {alias}")
        statements = [f"{indent}from .{flat[m]} import {', '.join(names)}\n" for m, names in by_module.items()]
        lines[node.lineno - 1 : node.end_lineno] = statements
    return GENERATED_HEADER + "".join(lines)


def _collect(roots: Iterable[str]) -> dict[str, _ModuleExport]:
    modules: dict[str, _ModuleExport] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in modules:
            continue
        modules[name] = export = _read_module(name)
        pending.extend(module for _, aliases in export.imports for module, _ in aliases.values())
    return modules


def _moe_zoo_configs(config: PreTrainedConfig) -> list[PreTrainedConfig]:
    """``config`` and every nested sub-config that is itself a moe_zoo config, outermost first."""
    found = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        value = getattr(config, key, None)
        if isinstance(value, PreTrainedConfig) and is_exportable(value):
            found.extend(_moe_zoo_configs(value))
    return found


def _footer(registrations: list[tuple[type, dict[str, type]]], flat: dict[str, str]) -> str:
    """Registration code appended to the top-level configuration module (see the module docstring)."""
    lines = ["\n\n# --- generated by moe-zoo: register the exported classes where nothing is registered yet ---\n"]
    lines.append("def _register_exported_classes():\n")
    lines.append("    import transformers\n")
    lines.append("    from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n\n")
    lines.append(f"    from .{flat[f'{ROOT_PACKAGE}.core.fused_experts']} import register_experts_implementation\n\n")
    lines.append("    register_experts_implementation()\n")
    for config_class, auto_classes in registrations[1:]:
        lines.append(f"    from .{flat[config_class.__module__]} import {config_class.__name__}\n")
        lines.append(f"    if {config_class.__name__}.model_type not in CONFIG_MAPPING:\n")
        lines.append(
            f"        transformers.AutoConfig.register({config_class.__name__}.model_type, {config_class.__name__})\n"
        )
        for auto_name, model_class in auto_classes.items():
            lines.append(f"        from .{flat[model_class.__module__]} import {model_class.__name__}\n")
            lines.append(
                f"        transformers.{auto_name}.register({config_class.__name__}, {model_class.__name__})\n"
            )
    lines.append("\n\n_register_exported_classes()\n")
    return "".join(lines)


def export_remote_code(config: PreTrainedConfig, save_directory: str | Path) -> dict[str, str]:
    """Write the code of ``config``'s model family (and of nested moe_zoo sub-models) into ``save_directory``,
    set ``config.auto_map``, and return that map. Call before the config is written."""
    from ..registration import auto_classes_for

    registrations = [(type(c), auto_classes_for(type(c))) for c in _moe_zoo_configs(config)]
    roots = {f"{ROOT_PACKAGE}.core.fused_experts"}
    for config_class, auto_classes in registrations:
        roots.add(config_class.__module__)
        roots.update(model_class.__module__ for model_class in auto_classes.values())
    modules = _collect(roots)
    flat = _flat_names(modules)
    top_config_module = registrations[0][0].__module__
    folder = Path(save_directory)
    for name, export in modules.items():
        code = _rewrite(export, flat)
        if name == top_config_module:
            code += _footer(registrations, flat)
        atomic_write_text(folder / f"{flat[name]}.py", code)  # replaces, never writes through a hard link
    config_class, auto_classes = registrations[0]
    auto_map = {"AutoConfig": f"{flat[config_class.__module__]}.{config_class.__name__}"}
    auto_map.update({auto: f"{flat[cls.__module__]}.{cls.__name__}" for auto, cls in auto_classes.items()})
    config.auto_map = auto_map
    return auto_map


def is_exported_code(path: Path) -> bool:
    """Whether ``path`` is a file an earlier :func:`export_remote_code` wrote."""
    with path.open(encoding="utf-8", errors="replace") as file:
        return file.readline() == GENERATED_HEADER


def remove_stale_code(folder: str | Path, auto_map: dict[str, str]) -> list[Path]:
    """Delete exported code files in ``folder`` that the model's current code no longer has: those not reachable
    by relative imports from the modules ``auto_map`` names. Returns the files removed."""
    folder = Path(folder)
    keep, pending = set(), [reference.split(".")[0] for reference in auto_map.values()]
    while pending:
        name = pending.pop()
        if name in keep or not (folder / f"{name}.py").is_file():
            continue
        keep.add(name)
        pending.extend(re.findall(r"^\s*from\s+\.(\w+)\s+import", (folder / f"{name}.py").read_text(), flags=re.M))
    stale = [path for path in folder.glob("*.py") if path.stem not in keep and is_exported_code(path)]
    for path in stale:
        path.unlink()
    return stale
