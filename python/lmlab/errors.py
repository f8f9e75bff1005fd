"""The exceptions lmlab raises for things a user can fix: a bad file, a run directory in the wrong
state, a save that failed. Each carries one line that names the file or setting and the cause; the
command line prints it as "lmlab <verb>: error: <line>" and exits 2.

They subclass ValueError so that callers catching the old ValueError keep working. This module
imports nothing from lmlab, so the library and the command line can both import it.
"""


class LmlabError(ValueError):
    """A user-facing error: one line saying what was wrong and, where it helps, what to do."""


class RunDirError(LmlabError):
    """A run directory cannot be used as asked: an existing run without --resume or --overwrite,
    no run to resume, a symlink inside it, another process holding it."""


class CheckpointError(LmlabError):
    """A file of a run could not be read (truncated, corrupted, inconsistent) or written (disk
    full, file too large, permission); the previous checkpoint stays current."""


class ConversionError(LmlabError):
    """A Hugging Face checkpoint lmlab's GPT cannot represent (naming the feature), or an export
    or import that cannot be written where asked."""
