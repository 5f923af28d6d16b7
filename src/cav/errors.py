"""The one exception type for problems the user can fix.

``cli.main`` catches it and prints its message as a single line on stderr with exit code 2.
Messages name the problem *and* the fix, e.g. ``"video 'x.mp4' has 3 frames, fewer than --frames 8: pass --frames 3 or a longer video"``.
"""


class CavError(Exception):
    """A user-facing error: one line, names the problem and the fix."""
