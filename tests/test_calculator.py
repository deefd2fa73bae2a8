"""The calculator tool: what it computes, what it refuses, and GSM8K's <<...>> calculations as tool calls."""
import pytest

import nanochat_one as nc
import tinyworld


@pytest.mark.parametrize("expr,result", [("1+2", "3"), ("12*7", "84"), ("10/4", "2.5"), ("12/4", "3"), ("7//2", "3"),
                                         ("-3**2", "-9"), ("(2+3)*4", "20"), ("2**10", "1024"), ("17 % 5", "2"),
                                         ("1.5*2", "3"), (" 4 - 10 ", "-6")])
def test_calculator_results(expr, result):
    assert nc.calculator(expr) == (True, result)


@pytest.mark.parametrize("expr", ["__import__('os').system('ls')", "x + 1", "print(1)", "(1).real", "'a' * 3",
                                  "[i for i in range(9)]", "9**9**9", "2**1000", "1/0", "lambda: 1", "1 if 1 else 2",
                                  "a=1", "1; 2", "open('f')", "10**70", "True + 1", "1 < 2", "~1", "1" * 300, "",
                                  "().__class__", "{1: 2}"])
def test_calculator_refuses(expr):
    ok, message = nc.calculator(expr)
    assert not ok and message.startswith("refused")


def test_calculator_parts_from_gsm8k():
    parts = tinyworld.calculator_parts("It costs 4*9 = <<4*9=36>>36 dollars.\n#### 36")
    assert parts == [dict(type="text", text="It costs 4*9 = "), dict(type="python", text="4*9"),
                     dict(type="python_output", text="36"), dict(type="text", text="36 dollars.\n#### 36")]
