"""How the demo rounds its numbers."""


def tidy(x: float) -> float:
    """Round to two decimals."""
    return round(x, 2)
