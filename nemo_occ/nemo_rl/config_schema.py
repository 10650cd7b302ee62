"""The config keys NeMo-RL's types know, read from its source tree, and the recipe keys they do not.

NeMo-RL validates a GRPO config as ``MasterConfig(**config)`` (``nemo_rl/algorithms/grpo.py``): pydantic
models declared ``extra="allow"`` whose fields are ``TypedDict``\\ s, so a misspelt key
(``grpo.max_num_step``) is accepted at launch and silently does nothing. :func:`unknown_keys` walks a
resolved recipe against those declarations and returns every key no declaration names.

The types are read with :mod:`ast` from the NeMo-RL source tree (``$NEMO_RL_ROOT``, in the container
``/opt/nemo-rl``), never imported: that works on a login node with only a NeMo-RL checkout and on any
Python, while importing ``nemo_rl.algorithms.grpo`` needs Python >= 3.12 and NeMo-RL's whole
environment. Rules, from the typing constructs NeMo-RL uses:

* a ``TypedDict`` or pydantic ``BaseModel`` class knows its annotated fields, those of its bases, and
  those of its subclasses in the tree (``policy.generation`` is declared ``GenerationConfig``, and
  the vLLM keys live on its subclass ``VllmConfig``); a ``Field(alias=...)`` adds the alias;
* ``X | Y``, ``Optional``/``Union`` merge the alternatives (``MegatronConfig | MegatronConfigDisabled``
  knows the keys of both); ``NotRequired``/``Required``/``ReadOnly``/``Annotated`` are looked through;
* ``dict[str, X]`` allows any key with values of type ``X``; ``list[X]`` checks each item as ``X``;
* ``Any``, a bare ``dict``, and every name that cannot be resolved inside the tree allow anything, so
  an unusual declaration can only hide a typo, never invent one.

Simplified: functional ``TypedDict("Name", {...})`` declarations and names re-bound at run time are
treated as open.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MASTER_CONFIG",
    "NemoRLSchema",
    "Schema",
    "UnknownKey",
    "declares",
    "load_nemo_rl_schema",
    "unknown_keys",
]

# Where NeMo-RL's GRPO entry point validates its config (examples/run_grpo.py: MasterConfig(**config)).
MASTER_CONFIG = ("nemo_rl.algorithms.grpo", "MasterConfig")

_LOOK_THROUGH = {"NotRequired", "Required", "ReadOnly", "Annotated", "Final"}
_UNION = {"Optional", "Union"}
_MAPPING = {"dict", "Dict", "Mapping", "MutableMapping", "OrderedDict", "DefaultDict", "defaultdict"}
_SEQUENCE = {"list", "List", "Sequence", "MutableSequence", "tuple", "Tuple", "set", "Set", "frozenset"}
_SCALAR = {"int", "str", "float", "bool", "bytes", "None", "NoneType", "Path", "Literal", "Type", "type"}
_ROOT_BASES = {"TypedDict", "BaseModel", "Generic", "object", "Protocol", "dict"}
_STDLIB_MODULES = ("typing", "typing_extensions", "collections", "collections.abc", "builtins", "pathlib")


@dataclass
class Schema:
    """What a config value may hold: named ``fields``, any key with ``values``, list ``items``, or anything.

    A schema with none of them set is a scalar: a mapping found there is not ours to judge.
    """

    fields: dict[str, Schema] | None = None
    values: Schema | None = None
    items: Schema | None = None
    open: bool = False

    def merge(self, other: Schema) -> Schema:
        """The schema of ``self | other``: every key either alternative knows."""
        if self.open or other.open:
            return Schema(open=True)
        merged = Schema()
        if self.fields is not None or other.fields is not None:
            merged.fields = dict(self.fields or {})
            for key, sub in (other.fields or {}).items():
                merged.fields[key] = merged.fields[key].merge(sub) if key in merged.fields else sub
        for attr in ("values", "items"):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(merged, attr, a.merge(b) if a is not None and b is not None else a or b)
        return merged


OPEN = Schema(open=True)
SCALAR = Schema()


@dataclass(frozen=True)
class UnknownKey:
    """A recipe key no NeMo-RL declaration names, and the declared keys it most resembles."""

    path: str
    suggestions: tuple[str, ...] = ()

    def __str__(self) -> str:
        hint = f" (did you mean {' or '.join(self.suggestions)}?)" if self.suggestions else ""
        return f"{self.path}{hint}"


# ---------------------------------------------------------------------------------------------
# Reading the declarations
# ---------------------------------------------------------------------------------------------
@dataclass
class _Module:
    name: str
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    aliases: dict[str, ast.expr] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local -> (module, attr)


class _Tree:
    """The ``nemo_rl`` package of a source tree, parsed on demand; resolves names to declarations."""

    def __init__(self, root: Path):
        self.root = root
        self._modules: dict[str, _Module | None] = {}
        self._schemas: dict[tuple[str, str], Schema] = {}
        self._subclasses: dict[tuple[str, str], list[tuple[_Module, ast.ClassDef]]] | None = None
        self.read_keys: set[str] = set()  # string keys the code reads: cfg["k"], cfg.get("k"), "k" in cfg

    # -- modules ---------------------------------------------------------------------------------
    def _path(self, name: str) -> Path | None:
        base = self.root.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def module(self, name: str) -> _Module | None:
        if name in self._modules:
            return self._modules[name]
        path = self._path(name)
        module = None
        if path is not None and name.split(".")[0] == "nemo_rl":
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError):
                tree = None
            if tree is not None:
                module = self._index(name, path, tree)
                self.read_keys |= _read_keys(tree)
        self._modules[name] = module
        return module

    @staticmethod
    def _index(name: str, path: Path, tree: ast.Module) -> _Module:
        module = _Module(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                module.classes[node.name] = node
            elif (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                module.aliases[node.targets[0].id] = node.value
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.value is not None
            ):
                if _head(node.annotation) == "TypeAlias":
                    module.aliases[node.target.id] = node.value
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - (node.level - 1)]
                    source = ".".join([*parent, source] if source else parent)
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = (source, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        module.imports[alias.asname] = (alias.name, None)
                    else:
                        top = alias.name.split(".")[0]
                        module.imports[top] = (top, None)
            elif hasattr(ast, "TypeAlias") and isinstance(node, ast.TypeAlias):  # `type X = ...` (3.12+)
                module.aliases[node.name.id] = node.value
        return module

    # -- names -------------------------------------------------------------------------------------
    def resolve(self, module: _Module, expr: ast.expr, depth: int = 0) -> tuple[str, Any]:
        """('class', (module, ClassDef)) | ('alias', (module, expr)) | ('name', str) | ('module', str)."""
        if depth > 20:
            return ("name", "?")
        if isinstance(expr, ast.Name):
            return self._lookup(module, expr.id, depth)
        if isinstance(expr, ast.Attribute):
            kind, value = self.resolve(module, expr.value, depth + 1)
            if kind == "module":
                target = self.module(value)
                if target is None:
                    return ("name", expr.attr) if value in _STDLIB_MODULES else ("name", "?")
                return self._lookup(target, expr.attr, depth + 1)
            if kind == "class":  # a nested class
                owner_module, owner = value
                for node in owner.body:
                    if isinstance(node, ast.ClassDef) and node.name == expr.attr:
                        return ("class", (owner_module, node))
            return ("name", "?")
        return ("name", "?")

    def _lookup(self, module: _Module, name: str, depth: int) -> tuple[str, Any]:
        if name in module.classes:
            return ("class", (module, module.classes[name]))
        if name in module.aliases:
            return ("alias", (module, module.aliases[name]))
        if name in module.imports:
            source, attr = module.imports[name]
            if attr is None:
                return ("module", source)
            target = self.module(source)
            if target is not None:
                return self._lookup(target, attr, depth + 1)
            submodule = self.module(f"{source}.{attr}")
            if submodule is not None:
                return ("module", submodule.name)
            return (
                ("name", attr)
                if source.split(".")[0] in _STDLIB_MODULES or source == "pydantic"
                else ("name", "?")
            )
        return ("name", name)  # a builtin (int, dict, ...) or an unknown global

    # -- schemas -------------------------------------------------------------------------------------
    def schema(self, module: _Module, expr: ast.expr | None) -> Schema:
        if expr is None:
            return OPEN
        if isinstance(expr, ast.Constant):
            if expr.value is None or expr.value is Ellipsis:
                return SCALAR
            if isinstance(expr.value, str):  # a forward reference
                try:
                    return self.schema(module, ast.parse(expr.value, mode="eval").body)
                except SyntaxError:
                    return OPEN
            return SCALAR
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
            return self.schema(module, expr.left).merge(self.schema(module, expr.right))
        if isinstance(expr, ast.Subscript):
            return self._subscript(module, expr)
        if isinstance(expr, ast.Name | ast.Attribute):
            kind, value = self.resolve(module, expr)
            if kind == "class":
                return self.class_schema(*value)
            if kind == "alias":
                return self.schema(*value)
            if kind == "name" and value in _SCALAR:
                return SCALAR
            return OPEN  # Any, bare dict/list, or a name outside the tree
        return OPEN

    def _subscript(self, module: _Module, expr: ast.Subscript) -> Schema:
        args = expr.slice.elts if isinstance(expr.slice, ast.Tuple) else [expr.slice]
        kind, value = self.resolve(module, expr.value)
        if kind == "class":  # a generic class of the tree, e.g. Config[T]
            return self.class_schema(*value)
        if kind == "alias":
            return self.schema(*value)
        name = value if kind == "name" else "?"
        if name in _LOOK_THROUGH:
            return self.schema(module, args[0])
        if name in _UNION:
            merged = SCALAR if name == "Optional" else None
            for arg in args:
                sub = self.schema(module, arg)
                merged = sub if merged is None else merged.merge(sub)
            return merged or OPEN
        if name in _MAPPING:
            return Schema(values=self.schema(module, args[-1]) if len(args) == 2 else OPEN)
        if name in _SEQUENCE:
            items = [a for a in args if not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
            merged = None
            for arg in items:
                sub = self.schema(module, arg)
                merged = sub if merged is None else merged.merge(sub)
            return Schema(items=merged or OPEN)
        if name in _SCALAR or name in ("Callable", "ClassVar"):
            return SCALAR
        return OPEN

    def class_schema(self, module: _Module, cls: ast.ClassDef) -> Schema:
        key = (module.name, cls.name)
        if key in self._schemas:
            return self._schemas[key]
        schema = Schema(fields={})
        self._schemas[key] = schema  # registered first: declarations may refer to themselves
        for base in cls.bases:
            kind, value = self.resolve(module, base.value if isinstance(base, ast.Subscript) else base)
            if kind == "class":
                self._absorb(schema, self.class_schema(*value))
            elif not (kind == "name" and value in _ROOT_BASES):
                schema.open = True  # a base we cannot read may declare anything
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if _head(node.annotation) == "ClassVar":
                continue
            sub = self.schema(module, node.annotation)
            for name in (node.target.id, _alias(node.value)):
                if name:
                    schema.fields[name] = schema.fields[name].merge(sub) if name in schema.fields else sub
        for sub_module, sub_cls in self.subclasses(key):
            self._absorb(schema, self.class_schema(sub_module, sub_cls))
        return schema

    @staticmethod
    def _absorb(schema: Schema, other: Schema) -> None:
        merged = schema.merge(other)
        schema.fields, schema.values, schema.items, schema.open = (
            merged.fields,
            merged.values,
            merged.items,
            merged.open,
        )

    def subclasses(self, key: tuple[str, str]) -> list[tuple[_Module, ast.ClassDef]]:
        if self._subclasses is None:
            self._subclasses = {}
            package = self.root / "nemo_rl"
            for path in sorted(package.rglob("*.py")):
                rel = path.relative_to(self.root).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                module = self.module(".".join(parts))
                if module is None:
                    continue
                for cls in module.classes.values():
                    for base in cls.bases:
                        kind, value = self.resolve(module, base)
                        if kind == "class":
                            base_key = (value[0].name, value[1].name)
                            self._subclasses.setdefault(base_key, []).append((module, cls))
        return self._subclasses.get(key, [])


def _read_keys(tree: ast.Module) -> set[str]:
    """String literals a module uses as mapping keys: ``x["k"]``, ``x.get("k")``/``pop``/``setdefault``, ``"k" in x``."""
    keys: set[str] = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript):
            key = node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
        ):
            key = node.args[0]
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            key = node.left
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
    return keys


def _head(expr: ast.expr) -> str | None:
    target = expr.value if isinstance(expr, ast.Subscript) else expr
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def _alias(value: ast.expr | None) -> str | None:
    """The ``alias=`` of a pydantic ``Field(...)`` default, if any."""
    if isinstance(value, ast.Call) and _head(value.func) == "Field":
        for kw in value.keywords:
            if kw.arg == "alias" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                return kw.value.value
    return None


@dataclass(frozen=True)
class NemoRLSchema:
    """NeMo-RL's declared ``MasterConfig`` and the key names its code reads without declaring them."""

    master: Schema
    read_keys: frozenset[str]


def load_nemo_rl_schema(root: str | Path) -> NemoRLSchema | None:
    """The schema of NeMo-RL's GRPO ``MasterConfig`` in the source tree ``root``; None if it is not there."""
    tree = _Tree(Path(root))
    module = tree.module(MASTER_CONFIG[0])
    if module is None or MASTER_CONFIG[1] not in module.classes:
        return None
    master = tree.class_schema(module, module.classes[MASTER_CONFIG[1]])
    tree.subclasses(MASTER_CONFIG)  # parses the whole package, so read_keys covers all of its code
    return NemoRLSchema(master=master, read_keys=frozenset(tree.read_keys))


# ---------------------------------------------------------------------------------------------
# Walking a recipe
# ---------------------------------------------------------------------------------------------
def declares(schema: Schema, dotted: str) -> bool:
    """Whether ``schema`` names the dotted key path (an open or ``dict[str, X]`` level names every key)."""
    node = schema
    for part in dotted.split("."):
        if node.open:
            return True
        if node.fields is not None and part in node.fields:
            node = node.fields[part]
        elif node.values is not None:
            node = node.values
        else:
            return False
    return True


def unknown_keys(
    config: Mapping[str, Any],
    schema: Schema,
    *,
    ignore: frozenset[str] | set[str] = frozenset(),
    read_keys: frozenset[str] | set[str] = frozenset(),
) -> list[UnknownKey]:
    """Every key of ``config`` that ``schema`` does not name, as a dotted path, in the config's order.

    ``ignore``: dotted paths (and their subtrees) not to report, e.g. the ``nemo_occ`` block (checked
    strictly by nemo-occ itself) or keys inherited from NeMo-RL's own base config. ``read_keys``: key
    names NeMo-RL's code reads although no type declares them (``vllm_cfg.get("enable_prefix_caching")``);
    they are accepted wherever they appear, and their subtrees are not walked.
    """
    return list(_walk(config, schema, "", ignore, read_keys))


def _walk(value: Any, schema: Schema, path: str, ignore, read_keys) -> Iterator[UnknownKey]:
    if schema.open:
        return
    if isinstance(value, Mapping):
        if schema.fields is None and schema.values is None:
            return
        for key, sub in value.items():
            key = str(key)
            dotted = f"{path}.{key}" if path else key
            if dotted in ignore:
                continue
            if schema.fields is not None and key in schema.fields:
                yield from _walk(sub, schema.fields[key], dotted, ignore, read_keys)
            elif schema.values is not None:
                yield from _walk(sub, schema.values, dotted, ignore, read_keys)
            elif key not in read_keys:
                close = difflib.get_close_matches(key, list(schema.fields or ()), n=2, cutoff=0.75)
                yield UnknownKey(dotted, tuple(f"{path}.{c}" if path else c for c in close))
    elif isinstance(value, list) and schema.items is not None:
        for i, item in enumerate(value):
            yield from _walk(item, schema.items, f"{path}[{i}]", ignore, read_keys)
