"""What every option's parser shares."""
from __future__ import annotations


def check_parameters(option: str, given: dict, valid, implicit=()) -> None:
    """ValueError naming the keys of an option's dict that are not among `valid` (nor `implicit`, keys such
    as 'kind' that select the form and are not listed as parameters)."""
    bad = sorted(set(given) - set(valid) - set(implicit))
    if bad:
        raise ValueError(f"{option} has no parameter(s) {bad}; valid: {list(valid)}")
