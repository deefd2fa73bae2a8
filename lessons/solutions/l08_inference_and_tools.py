"""Solutions to lesson 8's "Try it" (checked by lessons/exercises/l08_inference_and_tools.py)."""
import ast
import math
import operator
import pathlib
import sys
import warnings

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: sandbox.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import sandbox  # noqa: E402


def top_p_filter(logits, p):
    probs, order = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs  # the probability of the more likely tokens, before each one
    keep_sorted = before < p  # keep a token while the sum so far has not reached p
    keep_sorted[..., 0] = True  # at least the most likely token
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator_with_sqrt(expression, max_length=200, max_exponent=64, max_magnitude=10**60):
    if len(expression) > max_length:
        return False, f"refused: expression longer than {max_length} characters"

    def value_of(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            value = UNARY[type(node.op)](value_of(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            left, right = value_of(node.left), value_of(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > max_exponent:
                raise ValueError(f"exponent larger than {max_exponent}")
            value = BINARY[type(node.op)](left, right)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
              and len(node.args) == 1 and not node.keywords and not isinstance(node.args[0], ast.Starred)):
            x = value_of(node.args[0])
            if x < 0:
                raise ValueError("square root of a negative number")
            value = math.sqrt(x)
        else:
            raise ValueError(f"{type(node).__name__} is not allowed (only numbers, + - * / // % ** and sqrt)")
        if isinstance(value, complex) or abs(value) > max_magnitude:
            raise ValueError("result too large")
        return value

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = value_of(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        return False, "refused: not an arithmetic expression"
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        return False, f"refused: {e}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return False, "refused: result is not a finite number"
        value = int(value) if value.is_integer() else round(value, 6)
    return True, str(value)


def _top_p_without_the_crossing_token(logits, p):  # stops before the token that reaches p
    probs, order = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    keep_sorted = probs.cumsum(dim=-1) <= p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def _sqrt_of_the_whole_expression_only(expression):  # misses sqrt inside an expression: "2*sqrt(9)+1"
    text = expression.strip()
    if not (text.startswith("sqrt(") and text.endswith(")")):
        return sandbox.calculator(expression)
    ok, inner = sandbox.calculator(text[5:-1])
    if not ok or float(inner) < 0:
        return False, "refused: not a square root of a number >= 0"
    root = math.sqrt(float(inner))
    return True, str(int(root) if root.is_integer() else round(root, 6))


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    top_p_filter=_top_p_without_the_crossing_token,
    calculator_with_sqrt=_sqrt_of_the_whole_expression_only,
)
