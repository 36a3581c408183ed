"""The one exception type minigpt2 raises for problems the user can fix.

Every message says what is wrong and what to do about it. The command-line scripts catch
`MiniGPT2Error`, print its message and exit non-zero, so a bad file or a typo never ends in a
traceback from deep inside a library. Anything else that escapes is a bug in minigpt2.
"""


class MiniGPT2Error(Exception):
    """A problem with the user's input (a checkpoint, a model name, a file, an option)."""


class CheckpointError(MiniGPT2Error):
    """A checkpoint that cannot be found, read, or matched to the model."""
