"""Video metrics. A metric that has no meaningful value for its input raises ``Undefined`` with the reason."""

from cav.errors import CavError


class Undefined(CavError):
    """The metric is not defined for this input (a still, one frame, nothing trackable): its message is the reason.

    Raised instead of returning a number that would read as a score (e.g. a perfect 1.0 for two untrackable videos).
    """


def shown(value, digits: int = 3, why: str | None = None) -> str:
    """A score as text for a table; a missing one (None: not measurable) reads ``n/a (why)`` instead of stopping the
    table (every printed table goes through here, so one unmeasurable metric never crashes a command)."""
    if value is None:
        return f"n/a ({why})" if why else "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
