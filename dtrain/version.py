"""dtrain's version (also in pyproject.toml), in a module of its own: modules that write it (checkpoint
manifests, doctor reports) import it without running back up through dtrain/__init__.py."""

__version__ = "0.1.0"
