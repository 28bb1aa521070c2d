"""Typed errors. Domain code raises these; only the CLI turns them into exit codes."""


class AlexnetPipeError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class LayoutError(AlexnetPipeError):
    """The raw input directory is not in a layout we understand."""


class SettingsMismatchError(AlexnetPipeError):
    """An output directory was started with other settings or other input."""


class FormatError(AlexnetPipeError):
    """Bytes that do not parse as the format they claim to be."""


class DatasetError(AlexnetPipeError):
    """A converted dataset directory is missing, incomplete or inconsistent."""


class OldMeanFormatError(DatasetError):
    """A dataset holds only an old (full-image) mean; `update-mean` fixes it."""


class UnsafePickleError(AlexnetPipeError):
    """A pickle tried to load something other than numpy arrays."""


class CheckpointError(AlexnetPipeError):
    """A weights or checkpoint file is unreadable or does not fit the model/dataset."""


class TrainingError(AlexnetPipeError):
    """Training cannot go on (diverged, wrong device) and the message says what to change."""


class BusyError(AlexnetPipeError):
    """Another process is writing the same output."""


class InputError(AlexnetPipeError, ValueError):
    """A value the user gave (an option, an argument, a file's content) that cannot be used. A
    ValueError too, so callers that catch ValueError keep working."""


class ConfigError(InputError):
    """A setting is out of range or conflicts with another (a config's ``__post_init__`` check).
    A ValueError too, so callers that catch ValueError for bad settings keep working."""
