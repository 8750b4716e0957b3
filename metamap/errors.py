"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class MetamapError(Exception):
    """Base class: the message says what was wrong and what to do."""


class DataError(MetamapError):
    """A data set, folder or file cannot be used as asked."""


class EpisodeError(MetamapError, ValueError):
    """An N-way K-shot Q-query request the data cannot satisfy, or a nonsensical one."""


class ConfigError(MetamapError, ValueError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(MetamapError):
    """A checkpoint is missing, damaged, or does not match what it is loaded into."""


class DownloadError(MetamapError):
    """A download failed or its contents did not match the expected checksum."""


class DivergenceError(MetamapError):
    """Training produced non-finite losses or gradients too many times."""


class OutputError(MetamapError):
    """A file or folder to be written cannot be written there (checked before any work)."""


class ExportError(MetamapError):
    """A learner cannot be exported as asked, or the export's optional packages are missing."""
