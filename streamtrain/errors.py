"""The two kinds of error a run ends with, so the command line can tell them apart.

``UserError``: something the user asked for cannot be done as asked — a config key, a path,
input data, a checkpoint to resume. Raised before or while training, reported as one line,
exit status 2. ``TrainingError``: a run that was set up correctly failed while it ran
(exit status 1). Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the config, the command line or the input; the message says what and where.

    A ValueError, so code validating values with ``except ValueError`` keeps working.
    """


class TrainingError(RuntimeError):
    """A correctly configured run that could not go on (reported without a traceback)."""
