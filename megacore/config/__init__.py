"""Typed, validated configuration.

Every section is a dataclass with a ``validate()`` that names the bad field, the value and the fix.
``RunConfig`` groups the sections of one training run and is what ``megacore train CONFIG.yaml
key=value ...`` builds: YAML file first, then dotted overrides, then ``validate()``. Unknown keys
are errors that list the nearest valid names, so a typo never silently falls back to a default.

One concept per module, imported in this order (each only from the ones above it):

* ``errors``  -- ``ConfigError``;
* ``fields``  -- ``doc``: a field declared with its one-line documentation (``--help`` reads it);
* ``model``   -- ``TransformerConfig`` (the ``model:`` section);
* ``vision``  -- ``VisionConfig`` (the ``vision:`` section, the image side of LLaVA);
* ``support`` -- the support matrix: which layouts, features and model kinds run together
  (``support_doc`` renders it as ``docs/support-matrix.md``);
* ``run``     -- the run sections (``parallel``, ``train``, ``data`` ...) and ``RunConfig``;
* ``loading`` -- ``load_run_config``: YAML and ``dotted.key=value`` overrides into a ``RunConfig``,
  and ``dump_run_config``, the YAML that reads back to the same ``RunConfig``;
* ``help``    -- every key with its type, default and doc (``megacore train --help``).

Every public name is re-exported here: ``from megacore.config import RunConfig``.
"""

from megacore.config.errors import ConfigError
from megacore.config.model import (
    ACTIVATIONS,
    ATTENTION_BACKENDS,
    LAYER_KINDS,
    NORMALIZATIONS,
    POSITION_EMBEDDINGS,
    ROTARY_SCALINGS,
    TransformerConfig,
)
from megacore.config.vision import VisionConfig
from megacore.config.support import check_supported
from megacore.config.run import (
    COMPILE_MODES,
    CONTEXT_MODES,
    TP_COMM_OVERLAP_MODES,
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ParallelConfig,
    PrecisionConfig,
    ProfileConfig,
    RecomputeConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
)
from megacore.config.loading import apply_override, from_dict, load_run_config

__all__ = [
    "ACTIVATIONS", "ATTENTION_BACKENDS", "COMPILE_MODES", "CONTEXT_MODES", "LAYER_KINDS", "NORMALIZATIONS", "POSITION_EMBEDDINGS",
    "ROTARY_SCALINGS", "TP_COMM_OVERLAP_MODES", "CheckpointConfig", "ConfigError", "DataConfig", "LogConfig",
    "ParallelConfig", "PrecisionConfig", "ProfileConfig", "RecomputeConfig", "RunConfig", "TrainConfig", "TransformerConfig",
    "VisionConfig", "WandbConfig", "apply_override", "check_supported", "from_dict", "load_run_config",
]
