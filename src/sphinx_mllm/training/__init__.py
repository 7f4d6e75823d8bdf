"""L6: training SPHINX models: config, loop, distributed wrapping, checkpoints, feature cache, adapters, logs.

`sphinx-mllm train CONFIG.yaml` runs `train(load_config(CONFIG))`; the same command runs on one process,
N CPU processes and N GPUs under torchrun.
"""

from sphinx_mllm.training.adapters import apply_adapters, fold_adapter, load_adapter
from sphinx_mllm.training.config import TrainConfig, load_config, parse_overrides
from sphinx_mllm.training.feature_cache import CacheReport, FeatureCache, build_feature_cache, encoder_fingerprint
from sphinx_mllm.training.logs import TrainCallback, plot_loss_curves, read_metrics
from sphinx_mllm.training.trainer import Trainer, TrainResult, train

__all__ = [
    "CacheReport", "FeatureCache", "TrainCallback", "TrainConfig", "TrainResult", "Trainer", "apply_adapters",
    "build_feature_cache", "encoder_fingerprint", "fold_adapter", "load_adapter", "load_config", "parse_overrides",
    "plot_loss_curves", "read_metrics", "train",
]
