"""The errors a user's model folder, file or fast-path choice can cause, with messages that say how to fix them."""


class ModelFolderError(ValueError):
    """A teacher or generator (folder or single file) that cannot be used; the message says how to fix it."""


class BackendError(RuntimeError):
    """A backend, attention or precision choice that cannot run here; the message says how to fix it."""
