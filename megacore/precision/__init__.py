"""Mixed precision: dtype helpers, loss scaling (fp16) and FP8 GEMMs (`megacore.precision.fp8`, imported
on demand: `apply_fp8`, `fp8_linear`)."""

from megacore.precision.loss_scaler import (ConstantLossScaler, DynamicLossScaler, LossScaler, build_loss_scaler,
                                            unscale_and_check_)
from megacore.precision.mixed import (DTYPES, autocast, cast_params_, needs_loss_scaling, needs_master_weights,
                                      resolve_dtype)

__all__ = [
    "ConstantLossScaler", "DTYPES", "DynamicLossScaler", "LossScaler", "autocast", "build_loss_scaler",
    "cast_params_", "needs_loss_scaling", "needs_master_weights", "resolve_dtype", "unscale_and_check_",
]
