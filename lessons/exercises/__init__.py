"""Checks for the lessons' "Try it" exercises.

Each lesson ends with exercises: a stub for you to fill in, then a call to its check, e.g.

    from exercises import l01_tokenizer as check

    def encode(text, merges):
        ...  # your code here

    check.encode(encode)

A check runs your function against an oracle (the file's own implementation, PyTorch, a worked
example) and prints what it found. A function still at its stub (it returns None or raises
NotImplementedError) counts as not attempted, so every lesson runs top to bottom before you try;
a wrong answer raises an AssertionError that says what differs. lessons/solutions/ holds a solution
to every exercise, module by module with the same names; tests/test_lessons.py runs each solution
through its check and each check against a wrong answer.
"""
import functools


class NotAttempted(Exception):
    """Raised by attempt() when the function under test is still a stub."""


def attempt(fn, *args, **kwargs):
    """Call the learner's function; a stub (None returned, NotImplementedError) is not attempted."""
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        raise NotAttempted from None
    if result is None:
        raise NotAttempted
    return result


def exercise(check):
    """Make check(fn, ...) an exercise: it prints "correct" when fn passes and "not attempted yet"
    when fn is still a stub; a wrong fn raises the check's AssertionError. It returns nothing (a
    notebook would display it); run.outcome remembers the last one: "correct" or "not attempted"."""
    @functools.wraps(check)
    def run(fn, *args, **kwargs):
        lesson = check.__module__.rsplit(".", 1)[-1]
        run.outcome = None
        try:
            check(fn, *args, **kwargs)
        except NotAttempted:
            print(f"{check.__name__}: not attempted yet (a solution: lessons/solutions/{lesson}.py)")
            run.outcome = "not attempted"
            return
        print(f"{check.__name__}: correct")
        run.outcome = "correct"
    run.is_exercise = True
    return run
