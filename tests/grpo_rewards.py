"""Reward functions that tests/test_grpo.py names as `grpo_rewards:NAME` (module:function)."""


def short(prompts, completions, **fields):
    """1 for a completion of at most 12 characters: a reward the tiny model can earn."""
    assert len(fields["answer"]) == len(completions)  # the rows' other fields arrive
    return [float(len(c) <= 12) for c in completions]


def raises(prompts, completions, **fields):
    raise ValueError("no score today")


def too_few(prompts, completions, **fields):
    return [1.0] * (len(completions) - 1)


def not_finite(prompts, completions, **fields):
    return [0.0] * 2 + [float("nan")] + [0.0] * (len(completions) - 3)
