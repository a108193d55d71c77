"""The data layer's one user error, in a module of its own: every data module raises it, so none has to
import another (shards, sources, folder) only for it."""


class DataError(RuntimeError):
    """Shards are missing, unreadable or don't fit the run; the message names the file."""
