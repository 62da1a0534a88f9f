"""Errors that public entry points report as one line (no traceback).

Everything the library raises on bad *input* (config, checkpoint, prompt,
data, mesh) is a `JaxlmError`; the command line prints `error: <message>` and
exits with status 2. Anything else is a bug and keeps its traceback.
"""


class JaxlmError(Exception):
    """Bad input to a public entry point; the message is one line."""


class ConfigError(JaxlmError):
    """An unknown key or an inconsistent value in a config."""


class CheckpointError(JaxlmError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class InputError(JaxlmError):
    """Bad user data: prompts, corpus files, tokenizer files."""
