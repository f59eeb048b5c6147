"""The one error a user's model folder or file can cause, with a message that says how to fix it."""


class ModelFolderError(ValueError):
    """A teacher or generator (folder or single file) that cannot be used; the message says how to fix it."""
