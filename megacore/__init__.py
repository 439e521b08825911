"""megacore: transformer building blocks and every model-parallel strategy, in pure PyTorch."""

from megacore.config import (  # noqa: F401
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    RunConfig,
    TrainConfig,
    TransformerConfig,
)

__version__ = "0.1.0"
