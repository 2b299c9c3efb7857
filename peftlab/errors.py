"""Exceptions peftlab raises. Each message is one sentence a person can act on."""
from __future__ import annotations


class PeftlabError(Exception):
    """Base class of every error peftlab raises on purpose."""


class ConfigError(PeftlabError, ValueError):
    """A method config, a target spec or a saved adapter_config.json is invalid."""


class TargetError(ConfigError):
    """A target spec names modules that do not exist or cannot be adapted."""


class CheckpointError(PeftlabError, ValueError):
    """An adapter folder or file is missing, truncated, corrupted or does not fit the model."""


class AdapterStateError(PeftlabError, RuntimeError):
    """An adapter operation is not allowed in the current state (e.g. deleting a merged adapter)."""


class MergeError(PeftlabError, RuntimeError):
    """A merge would be wrong: non-finite weights, or a method that cannot be merged."""
