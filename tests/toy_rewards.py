"""Reward functions for the tests, referenced from configs as "toy_rewards:NAME" (pytest puts tests/ on sys.path)."""

import math

CALLS: list[dict] = []  # what each recording call received, for the tests to read
FAIL_FROM_CALL = {"n": 1}  # failing_* functions succeed this many calls, then fail


def answer_match(prompts, completions, answer, **columns):
    """1.0 when the completion contains the row's answer, None when the row has none (TRL's "does not apply")."""
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "answer": list(answer), **columns})
    return [None if a is None else float(str(a) in c) for a, c in zip(answer, completions)]


def length_reward(prompts, completions, **columns):
    return [len(c) / 100.0 for c in completions]


def _after_first_calls(bad_output):
    def fn(prompts, completions, **columns):
        CALLS.append({"completions": list(completions)})
        if len(CALLS) > FAIL_FROM_CALL["n"]:
            return bad_output(len(completions))
        return [0.0] * len(completions)

    return fn


def _raise(n):
    raise ZeroDivisionError("division by zero in the grader")


failing_raises = _after_first_calls(_raise)
failing_raises.__name__ = "failing_raises"
failing_length = _after_first_calls(lambda n: [0.0] * (n - 1))
failing_length.__name__ = "failing_length"
failing_nan = _after_first_calls(lambda n: [math.nan] * n)
failing_nan.__name__ = "failing_nan"

NOT_CALLABLE = 3.0
