"""Solutions to lesson 8's "Try it" (checked by lessons/exercises/l08_inference_and_tools.py)."""
import ast
import math
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


class _SqrtAsPower(ast.NodeTransformer):
    """sqrt(x) -> (x) ** 0.5, for a call with exactly one plain argument; anything else stays, for
    the calculator to refuse."""
    def visit_Call(self, node):
        self.generic_visit(node)
        if (isinstance(node.func, ast.Name) and node.func.id == "sqrt" and len(node.args) == 1
                and not node.keywords and not isinstance(node.args[0], ast.Starred)):
            return ast.BinOp(node.args[0], ast.Pow(), ast.Constant(0.5))
        return node


def calculator_with_sqrt(expression, max_length=200):
    """The calculator itself, run on the expression with every sqrt(x) rewritten as (x) ** 0.5:
    the same results, formatting and refusals, with nothing of its own to get wrong."""
    if len(expression) > max_length:
        return sandbox.calculator(expression, max_length=max_length)  # its own refusal
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return sandbox.calculator(expression)  # its own refusal
    if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "sqrt" and len(n.args) == 1
           and not n.keywords and not isinstance(n.args[0], ast.Starred) and _is_negative(n.args[0])
           for n in ast.walk(tree)):
        return False, "refused: square root of a negative number"
    rewritten = ast.unparse(_SqrtAsPower().visit(tree))
    return sandbox.calculator(rewritten, max_length=max(max_length, len(rewritten)))


def _is_negative(node):
    ok, text = calculator_with_sqrt(ast.unparse(node))
    return ok and float(text) < 0


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
