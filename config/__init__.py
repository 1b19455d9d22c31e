"""Config loading: `python X.py config/NAME.py --key=value ...` -> one flat, typed namespace.

A config file is data, not code: `name = literal` lines (numbers, strings, bools, None, lists, dicts, tuples,
arithmetic between numbers such as `2_000 * 4096`) parsed with `ast`, never executed; a first line
`base = "other.py"` reads that file first, so an ablation holds only what it changes. The known keys are the
fields of the dataclasses each entry point names; unknown keys and wrong types (element by element) are one-line
ValueErrors naming the file:line or the override. With `prog`, -h/--help prints the keys and exits 0, and no
arguments print them and exit 2:

    from config import load, pick
    ns = load(sys.argv[1:], ModelConfig, DataConfig, TrainConfig, prog="python train.py")
    mc = ModelConfig(**pick(ns, ModelConfig))"""
import ast
import contextlib
import dataclasses
import operator
import os
import sys
import types
import typing

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def _literal(node, where, operand=False):
    """Evaluate a literal expression (plus arithmetic between numbers) without executing anything."""
    if isinstance(node, (ast.BinOp, ast.UnaryOp)) and type(node.op) in _OPS:
        operands = (node.left, node.right) if isinstance(node, ast.BinOp) else (node.operand,)
        try:
            value = _OPS[type(node.op)](*(_literal(n, where, operand=True) for n in operands))
        except ArithmeticError as e:
            raise ValueError(f"{where}: {ast.unparse(node)}: {e}") from None
    elif isinstance(node, (ast.List, ast.Tuple)):
        value = [_literal(e, where) for e in node.elts]
    elif isinstance(node, ast.Dict) and None not in node.keys:  # a None key is a `**` unpacking
        value = {_literal(k, where): _literal(v, where) for k, v in zip(node.keys, node.values)}
    elif isinstance(node, ast.Constant):
        value = node.value
    else:
        raise ValueError(f"{where}: expected a literal value, got `{ast.unparse(node)}`")
    if operand and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise ValueError(f"{where}: arithmetic is only allowed between numbers")
    return value


def parse_file(path, _seen=()):
    """Return {key: (value, "file:line")} from a config file of `name = literal` lines, bases first."""
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    if os.path.realpath(path) in _seen:
        raise ValueError(f"{path}: `base` chain loops back to this file")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
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


def schema(*classes):
    """{key: (type, default, owner)} over the named config dataclasses. Two of them may share a key (a
    post-training `lr` beside pretraining's) only with one type: the one value then feeds both."""
    fields = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in fields and fields[f.name][0] != hints[f.name]:
                raise ValueError(f"config key {f.name!r} is {_name(fields[f.name][0])} in {fields[f.name][2]} "
                                 f"but {_name(hints[f.name])} in {cls.__name__}")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields.setdefault(f.name, (hints[f.name], default, cls.__name__))
    return fields


def usage(prog, fields):
    """The command line, then one line per key: `--name=default  (type)`, grouped by dataclass."""
    lines = [f"usage: {prog} CONFIG_FILE [--key=value ...]"]
    for cls in dict.fromkeys(owner for _, _, owner in fields.values()):
        lines += [f"{cls}:"] + [f"  --{key}={default!r}  ({_name(tp)})"
                                for key, (tp, default, owner) in fields.items() if owner == cls]
    return "\n".join(lines)


def check_type(value, tp, where):
    """Raise ValueError unless `value` fits annotation `tp`; return it (ints widened to float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            with contextlib.suppress(ValueError):
                return check_type(value, a, where)
    if tp is typing.Any or tp is type(None) and value is None or tp in (str, bool) and isinstance(value, tp):
        return value
    if tp in (int, float) and isinstance(value, (int, tp)) and not isinstance(value, bool):  # an int is a float too
        return tp(value)
    if (origin is list or tp is list) and isinstance(value, (list, tuple)):
        return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if (origin is dict or tp is dict) and isinstance(value, dict):
        return {check_type(k, args[0], f"{where} key"): check_type(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()} if args else value
    raise ValueError(f"{where}: expected {_name(tp)}, got {type(value).__name__} {value!r}")


def _name(tp):
    """int, list[str], int | None: an annotation as it is written in the dataclass."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp)


def load(argv, *classes, prog=None, strict=True):
    """Parse `[CONFIG_FILE] [--key=value ...]` into a SimpleNamespace of every key of `classes` (absent: its
    default); `prog`: see above. `strict=False` skips file keys they do not own (model.py reads a training config)."""
    fields = schema(*classes)
    if prog is not None and (not argv or any(a in ("-h", "--help") for a in argv)):
        print(usage(prog, fields), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    values, raws = {}, {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"override {arg!r}: expected --key=value")
            key, raw = arg[2:].split("=", 1)
            try:
                val = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw  # bare words are strings: --out_dir=out/x
            values[key], raws[key] = (val, f"override --{key}"), raw
        elif "=" in arg and not os.path.isfile(arg):
            raise ValueError(f"{arg!r}: overrides start with two dashes (did you mean --{arg}?)")
        elif i > 0:  # after the file or an override
            raise ValueError(f"config file {arg!r}: give one config file, before the --key=value overrides")
        else:
            values.update({k: v for k, v in parse_file(arg).items() if strict or k in fields})
    ns = {k: default for k, (_, default, _) in fields.items()}
    for key, (val, where) in values.items():
        if key not in fields:
            close = [k for k in fields if k.replace("_", "") == key.replace("_", "") or k.startswith(key[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{where}: unknown config key {key!r}{hint}")
        tp, where_key = fields[key][0], f"{where}: key {key!r}"
        try:
            ns[key] = check_type(val, tp, where_key)
        except ValueError:
            # an override (they come after the file): --out_dir=2024 or --init_from=1e3 is the text as typed
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            if key not in raws or str not in (typing.get_args(tp) if union else (tp,)):
                raise
            ns[key] = raws[key]
    return types.SimpleNamespace(**ns)


def pick(ns, cls):
    """Keyword arguments for dataclass `cls` taken from namespace `ns`."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
