"""The errors a user can cause (bad config, data, checkpoint, diverged run): reported in one line."""

from gpt.checkpoint import CheckpointError
from gpt.config import ConfigError
from gpt.data import DataError
from gpt.train import TrainingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, ValueError, FileNotFoundError)
