"""The base of every problem with what the user gave: flags, files, data, machine.

A ``UserError``'s message says what is wrong and what to do, so the command-line programs print it as one line
without a traceback (``mulmodseg.cli``); an error of any other class is a bug or a failure of the system. The
package's own problem classes derive from it (``data.DataError``, ``config.TrainingError``,
``checkpoint.CheckpointError``, ...). The ``text`` package keeps its errors apart (``text.WeightsError``, ...),
since it stays importable without the rest of mulmodseg; training turns them into ``TrainingError``.

``DiskFullError`` is the machine's problem rather than the user's: an ``OSError`` (exit code 1), whose message
still names the file, the file system and what to do.
"""

import errno


class UserError(Exception):
    """A problem with the user's flags, files or data, its message naming it and how to fix it."""


class DiskFullError(OSError):
    """No space left (or the quota used up) while writing a file; the message names the file, its file system and
    what to do, and ``errno`` is ``ENOSPC`` or ``EDQUOT`` as the system said."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(message)
        self.errno = code
