"""User-facing errors: the CLI prints them as one clear line (no traceback) and exits 1."""


class DirlError(Exception):
    """Bad input or state the user can fix; the message says what and how."""


class SlideError(DirlError):
    """A slide cannot be opened or read, or lacks what the pipeline needs (e.g. its µm/px)."""


class StoreError(DirlError):
    """A store is missing, incomplete, or does not match what the reader expects."""


class ConfigError(DirlError):
    """A configuration value or sample-sheet row is invalid."""
