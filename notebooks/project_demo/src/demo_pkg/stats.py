"""Summary statistics, with a relative import of a sibling module."""

from .rounding import tidy


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, minimum and maximum of ``values``, rounded."""
    return {
        "mean": tidy(sum(values) / len(values)),
        "min": tidy(min(values)),
        "max": tidy(max(values)),
    }
