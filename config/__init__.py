"""Config loading: `python X.py config/NAME.py --key=value ...` -> one flat, typed namespace.

A config file is data, not code: it may hold only `name = literal` lines (numbers, strings, bools,
None, lists, dicts, tuples, and + - * / // ** between numbers, so `2_000 * 4096` is allowed). It is
parsed with `ast`, never executed. A first line `base = "other.py"` (a path relative to the file) reads
that file first, so an ablation config holds only the lines it changes. `--key=value` overrides follow
the one file; values parse as Python literals, and where a key takes a string, an override that is not
a literal of its type is the text as typed (`--out_dir=2024` is "2024").

Every key must be a field of one of the project's config dataclasses (model.ModelConfig,
data.DataConfig, train.TrainConfig, ...; a field name may belong to only one of them), and its value
must match that field's type, element by element for `list[str]`, `dict[str, float]`, `int | None`
(an int is accepted where a float is expected). Anything else is a one-line ValueError naming the
file/line or the override (and the offending element), before any work starts. Each file then picks
its own fields: `ModelConfig(**pick(ns, ModelConfig))`.

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
        a, b = _number(node.left, where), _number(node.right, where)
        try:
            return _BINOPS[type(node.op)](a, b)
        except ArithmeticError as e:
            raise ValueError(f"{where}: {ast.unparse(node)}: {e}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number(node.operand, where)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:  # a None key is a `**` unpacking
        return {_literal(k, where): _literal(v, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Constant):
        return node.value
    raise ValueError(f"{where}: expected a literal value, got `{ast.unparse(node)}`")


def _number(node, where):
    v = _literal(node, where)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"{where}: arithmetic is only allowed between numbers")
    return v


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
                    if f.name in fields:  # one flat namespace: a shared name would feed both classes one value
                        raise ValueError(f"config key {f.name!r} is a field of both {fields[f.name][2]} and {obj.__name__}")
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    fields[f.name] = (hints[f.name], default, obj.__name__)
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
        raise ValueError(f"{where}: expected {_name(tp)}, got {type(value).__name__} {value!r}")
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
            if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: one type per slot
                if len(args) != len(value):
                    raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
                return [check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
            return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return {check_type(k, args[0], f"{where} key"): check_type(v, args[1], f"{where}[{k!r}]")
                    for k, v in value.items()} if args else value
    elif tp is typing.Any:
        return value
    raise ValueError(f"{where}: expected {_name(tp)}, got {type(value).__name__} {value!r}")


def _accepts_str(tp):
    return tp is str or typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


def _name(tp):
    """int, list[str], int | None: an annotation as it is written in the dataclass."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp)


def load(argv, fields=None):
    """Parse `[CONFIG_FILE] [--key=value ...]` into a SimpleNamespace holding every known key.

    Keys absent from the file and overrides take their dataclass default. `fields` defaults to schema().
    """
    fields = schema() if fields is None else fields
    values, raws, config_file = {}, {}, None
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
            values[key], raws[key] = (val, where), raw
        elif config_file is not None or raws:
            raise ValueError(f"config file {arg!r}: give one config file, before the --key=value overrides")
        else:
            config_file = arg
            values.update(parse_file(arg))
    for key, (val, where) in values.items():
        if key not in fields:
            close = [k for k in fields if k.replace("_", "") == key.replace("_", "") or k.startswith(key[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{where}: unknown config key {key!r}{hint}")
        tp, where_key = fields[key][0], f"{where}: key {key!r}"
        if where.startswith("override") and not isinstance(val, str):
            try:
                val = check_type(val, tp, where_key)
            except ValueError:
                if not _accepts_str(tp):
                    raise
                val = raws[key]  # --out_dir=2024 or --init_from=1e3 is the text as typed
        values[key] = (check_type(val, tp, where_key), where)
    ns = {k: v[1] for k, v in fields.items()}
    ns.update({k: v[0] for k, v in values.items()})
    return types.SimpleNamespace(**ns)


def pick(ns, cls):
    """Keyword arguments for dataclass `cls` taken from namespace `ns`."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
