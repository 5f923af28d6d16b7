"""Video metrics. A metric that has no meaningful value for its input raises ``Undefined`` with the reason."""

from cav.errors import CavError


class Undefined(CavError):
    """The metric is not defined for this input (a still, one frame, nothing trackable): its message is the reason.

    Raised instead of returning a number that would read as a score (e.g. a perfect 1.0 for two untrackable videos).
    """
