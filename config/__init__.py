"""Config loading: `python X.py config/NAME.py --key=value ...` -> one flat, typed namespace.

A config file is data, not code: it may hold only `name = literal` lines (numbers, strings, bools,
None, lists, dicts, tuples, and + - * / // ** between numbers, so `2_000 * 4096` is allowed). It is
parsed with `ast`, never executed. A first line `base = "other.py"` (a path relative to the file) reads
that file first, so an ablation config holds only the lines it changes. `--key=value` overrides follow the file; values parse as Python
literals, and a value that is not a literal is taken as a string where the key is a string.

Every key must be a field of one of the project's config dataclasses (model.ModelConfig,
data.DataConfig, train.TrainConfig, ...), and its value must match that field's type (an int is
accepted where a float is expected). Anything else is a one-line ValueError naming the file/line or
the override, before any work starts. Each file then picks its own fields: `ModelConfig(**pick(ns, ModelConfig))`.

    from config import load, pick
    ns = load(sys.argv[1:])             # types.SimpleNamespace of every known key with its value
"""
import ast
import dataclasses
import importlib
import operator
import os
import types
import typing

# Modules whose `*Config` dataclasses together define the known keys. Imported lazily so that this
# package imports nothing at import time and a missing optional module is simply skipped.
SCHEMA_MODULES = ("model", "data", "train", "parallel", "posttrain", "eval")

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}


def _literal(node, where):
    """Evaluate a literal expression (plus number arithmetic) without executing anything."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _literal(node.left, where), _literal(node.right, where)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            raise ValueError(f"{where}: arithmetic is only allowed between numbers")
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand, where)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k, where): _literal(v, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Constant):
        return node.value
    raise ValueError(f"{where}: expected a literal value, got `{ast.unparse(node)}`")


def parse_file(path, _seen=()):
    """Return {key: (value, "file:line")} from a config file of `name = literal` lines, bases first."""
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    if os.path.realpath(path) in _seen:
        raise ValueError(f"{path}: `base` chain loops back to this file")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    try:
        tree = ast.parse(src, filename=path)
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    out = {}
    for stmt in tree.body:
        where = f"{path}:{stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise ValueError(f"{where}: expected `name = value`, got `{ast.unparse(stmt)}`")
        key, value = stmt.targets[0].id, _literal(stmt.value, where)
        if key == "base":
            if out or not isinstance(value, str):
                raise ValueError(f"{where}: `base` must be the first assignment and a file name string")
            out.update(parse_file(os.path.join(os.path.dirname(path), value), _seen + (os.path.realpath(path),)))
        else:
            out[key] = (value, where)
    return out


def schema():
    """{key: (type, default, owner)} over every project config dataclass that exists."""
    fields = {}
    for mod_name in SCHEMA_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue
            raise
        for obj in vars(mod).values():
            if dataclasses.is_dataclass(obj) and obj.__name__.endswith("Config") and obj.__module__ == mod_name:
                hints = typing.get_type_hints(obj)
                for f in dataclasses.fields(obj):
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    fields.setdefault(f.name, (hints[f.name], default, obj.__name__))
    return fields


def check_type(value, tp, where):
    """Raise ValueError unless `value` fits annotation `tp`; return it (ints widened to float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return check_type(value, a, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {tp}, got {value!r}")
    if tp is type(None):
        if value is None:
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            return [check_type(v, args[0], where) for v in value] if args and args[-1] is not Ellipsis and len(args) == 1 else list(value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return {check_type(k, args[0], where): check_type(v, args[1], where) for k, v in value.items()} if args else value
    elif tp is typing.Any:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


def load(argv, fields=None):
    """Parse `[CONFIG_FILE] [--key=value ...]` into a SimpleNamespace holding every known key.

    Keys absent from the file and overrides take their dataclass default. `fields` defaults to schema().
    """
    fields = schema() if fields is None else fields
    values = {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"override {arg!r}: expected --key=value")
            key, raw = arg[2:].split("=", 1)
            where = f"override --{key}"
            try:
                val = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw  # bare words are strings: --out_dir=out/x
            values[key] = (val, where)
        elif values:
            raise ValueError(f"config file {arg!r} must come before the --key=value overrides")
        else:
            values.update(parse_file(arg))
    for key, (val, where) in values.items():
        if key not in fields:
            close = [k for k in fields if k.replace("_", "") == key.replace("_", "") or k.startswith(key[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{where}: unknown config key {key!r}{hint}")
        tp = fields[key][0]
        if tp is str and not isinstance(val, str) and where.startswith("override"):
            val = str(val)
        values[key] = (check_type(val, tp, f"{where}: key {key!r}"), where)
    ns = {k: v[1] for k, v in fields.items()}
    ns.update({k: v[0] for k, v in values.items()})
    return types.SimpleNamespace(**ns)


def pick(ns, cls):
    """Keyword arguments for dataclass `cls` taken from namespace `ns`."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
