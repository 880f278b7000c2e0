"""Typed errors (CONTRACT §8): bad input raises one of these, never garbage."""


class MoeError(Exception):
    """Base class of every error the track reports to its user."""


class ConfigError(MoeError):
    """A model or training config that breaks CONTRACT §1 / §6."""


class InputError(MoeError):
    """An empty, out-of-range or mis-shaped batch, prompt or parameter."""


class CheckpointError(MoeError):
    """An unreadable, truncated or mismatched checkpoint."""


class NonFiniteError(MoeError):
    """A non-finite loss or gradient: the training step is refused."""
