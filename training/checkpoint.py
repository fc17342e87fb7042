"""A checkpoint is a directory: weights, config, vocabulary and metrics, everything serving needs.

    model.safetensors   the weights (item side features included, as buffers)
    config.json         model type + model config + data metadata (actions, genres) + training config
    vocab.json          dense index -> raw item id, and titles for people
    metrics.json        the evaluation the trainer wrote
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genrec.training.hstu import HSTU, HSTUConfig
from genrec.training.sasrec import SASRec, SASRecConfig

FORMAT_VERSION = 2  # 2: the ranking head is a RankHead with popularity features
ModelConfig: TypeAlias = HSTUConfig | SASRecConfig
# A checkpoint's "model_type": the module and its typed config
MODEL_TYPES: dict[str, tuple[type[nn.Module], type[ModelConfig]]] = {
    "hstu": (HSTU, HSTUConfig),
    "sasrec": (SASRec, SASRecConfig),
}


@dataclass(frozen=True)
class CheckpointMeta:
    """What the builders and the server need besides the weights."""

    model_config: ModelConfig  # its type says which model the weights are for
    item_raw_ids: np.ndarray  # (N,) raw id of dense index i + 1
    item_titles: np.ndarray  # (N+1,) object, '' unknown
    action_values: np.ndarray  # (A,) rating value of action id a + 1
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return model_type_of(self.model_config)

    def hstu_config(self) -> HSTUConfig:
        """The config of an HSTU checkpoint, the only kind the builders serve."""
        if not isinstance(self.model_config, HSTUConfig):
            raise ValueError(f"only HSTU checkpoints can be served (this one is {self.model_type})")
        return self.model_config


def model_type_of(config: ModelConfig) -> str:
    return next(name for name, (_, cls) in MODEL_TYPES.items() if isinstance(config, cls))


def build_model(config: ModelConfig) -> nn.Module:
    module_cls, _ = MODEL_TYPES[model_type_of(config)]
    return module_cls(config)


def save_checkpoint(directory: Path, model: nn.Module, meta: CheckpointMeta, metrics: dict | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    config = {
        "format_version": FORMAT_VERSION,
        "model_type": meta.model_type,
        "model": asdict(meta.model_config),
        "action_values": meta.action_values.tolist(),
        "data": meta.data,
        "train": meta.train,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    raw = meta.item_raw_ids
    vocab = {
        "item_id_type": "int" if np.issubdtype(raw.dtype, np.integer) else "str",
        "item_raw_ids": raw.tolist(),
        "item_titles": [str(t) for t in meta.item_titles],
    }
    (directory / "vocab.json").write_text(json.dumps(vocab))
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
    else:  # e.g. the best weights of a run still training: no test metrics yet, and none of an earlier run's
        (directory / "metrics.json").unlink(missing_ok=True)


def load_meta(directory: Path) -> CheckpointMeta:
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a genrec checkpoint: config.json is missing")
    config = json.loads((directory / "config.json").read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {config.get('format_version')} != {FORMAT_VERSION}")
    vocab = json.loads((directory / "vocab.json").read_text())
    dtype = np.int64 if vocab["item_id_type"] == "int" else object
    if config["model_type"] not in MODEL_TYPES:
        raise ValueError(f"{directory}: unknown model type {config['model_type']!r}; expected one of "
                         f"{sorted(MODEL_TYPES)}")
    _, config_cls = MODEL_TYPES[config["model_type"]]
    return CheckpointMeta(
        model_config=config_cls(**config["model"]),
        item_raw_ids=np.asarray(vocab["item_raw_ids"], dtype=dtype),
        item_titles=np.asarray(vocab["item_titles"], dtype=object),
        action_values=np.asarray(config["action_values"], dtype=np.float64),
        data=config.get("data", {}),
        train=config.get("train", {}),
    )


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """The model in eval mode and its metadata; outputs are bit-identical to the saved model's."""
    meta = load_meta(directory)
    model = build_model(meta.model_config)
    model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    return model.to(device).eval(), meta
