"""Which shape conditions a graph read from a file may evaluate: arithmetic and comparisons on the input's sizes.

The export path checks each input against conditions torch.export recorded, kept as Python expressions over
``x`` (``x.size()[2] == 224``, ``(x.size()[3] % 8) == 0``) and evaluated with ``eval``. A graph rebuilt from a
file must not evaluate any other expression, so :func:`is_size_condition` accepts only numbers, ``inf``, the
sizes of ``x`` (``x.size()[i]``, ``x.size(i)``, ``x.shape[i]``), arithmetic (powers by a small constant only, of
no other power, so that no condition computes a number of unbounded size), comparisons, ``and``/``or``/``not``
and a few numeric functions (``math.floor``, ``torch.sym_max``, ``int``, ``max``, ...), with no keyword
arguments, strings, attribute chains or other names.

>>> is_size_condition("1 + (((-1) + x.size()[3]) // 2) > 8"), is_size_condition("x.size()[1] == 3")
(True, True)
>>> is_size_condition("__import__('os').system('true')"), is_size_condition("x.__class__ == 3")
(False, False)
"""
import ast
from typing import Any

_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not,
              ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_BUILTINS = frozenset({"int", "float", "abs", "max", "min", "round"})
_MODULE_FUNCTIONS = {"math": frozenset({"floor", "ceil", "trunc", "sqrt", "log2", "gcd"}),
                     "torch": frozenset({"sym_int", "sym_float", "sym_max", "sym_min", "sym_sqrt", "sym_not"})}


def is_size_condition(code: Any) -> bool:
    """Whether ``code`` is a condition on the input's sizes only (see the module docstring)."""
    if not isinstance(code, str) or len(code) > 10_000:
        return False
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return _allowed(tree.body)


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, bool)
    if isinstance(node, ast.Name):
        return node.id == "inf"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):  # a small constant power of no power
        exponent = node.right
        return _allowed(node.left) and not _has_power(node.left) and isinstance(exponent, ast.Constant) \
            and type(exponent.value) is int and 0 <= exponent.value <= 64
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _OPERATORS) and _allowed(node.left) and _allowed(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _OPERATORS) and _allowed(node.operand)
    if isinstance(node, ast.BoolOp):
        return isinstance(node.op, _OPERATORS) and all(_allowed(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return all(isinstance(op, _OPERATORS) for op in node.ops) and all(
            _allowed(v) for v in [node.left, *node.comparators])
    if isinstance(node, ast.Subscript):
        return _is_sizes(node.value) and _is_index(node.slice)
    if isinstance(node, ast.Call):
        return _is_size_call(node) or _is_numeric_call(node)
    return False


def _has_power(node: ast.AST) -> bool:
    """Whether ``node`` holds a power: a power of a power (``(s ** 64) ** 64 ...``) would grow to any size."""
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node))


def _is_sizes(node: ast.AST) -> bool:
    """``x.size()`` or ``x.shape``."""
    if isinstance(node, ast.Attribute) and node.attr == "shape":
        return _is_x(node.value)
    return isinstance(node, ast.Call) and not node.args and not node.keywords and isinstance(node.func, ast.Attribute) \
        and node.func.attr == "size" and _is_x(node.func.value)


def _is_size_call(node: ast.Call) -> bool:
    """``x.size(i)``."""
    return isinstance(node.func, ast.Attribute) and node.func.attr == "size" and _is_x(node.func.value) \
        and not node.keywords and len(node.args) == 1 and _is_index(node.args[0])


def _is_numeric_call(node: ast.Call) -> bool:
    if node.keywords or not all(_allowed(a) for a in node.args):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in _BUILTINS
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
        func.attr in _MODULE_FUNCTIONS.get(func.value.id, ())


def _is_x(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "x"


def _is_index(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int
