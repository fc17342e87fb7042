"""checkpoint -> a complete, versioned Triton model repository, in one call.

    recommender/       recommend and rank fused, with the per-user K/V cache       (Python backend)
    user_encoder/      prefill: history -> user embedding + per-layer K/V          (Python backend)
    item_retrieval/    user embedding -> top `retrieve_k` items                    (Python backend)
    candidate_scorer/  K/V + candidates -> scores                                  (Python backend)
    top_n/             candidates + scores + k -> the k best                       (Python backend)
    recommend/         ensemble: recommender (retrieve, re-rank, top k)
    rank/              ensemble: recommender (the caller's candidates)
    retrieve/          ensemble: user_encoder -> item_retrieval -> top_n

`user_encoder`, `item_retrieval`, `candidate_scorer` and `top_n` stay public for callers who want the steps
separately. `recommend` and `rank` run in one model so that the K/V never crosses a process boundary
(through the Python backend's shared memory it cost more than the scoring it fed) and the user cache has one
owner: with the cache on, `recommender` has exactly one instance.

Every build writes version N+1 of every model; its ensembles pin their steps to version N+1, and the
composing models keep their two newest versions, so `genrec rollout` moves a running server to the new build
with no request failed or mixed. The ensemble wiring is the same for every runtime: only the artifacts and
the ``runtime`` parameter change.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from genrec.builders import handlers as h
from genrec.builders.limits import DEFAULT_USER_CACHE_MB, Limits
from genrec.builders.model_config import (
    DynamicBatching,
    EnsembleSpec,
    EnsembleStep,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    tensor_from_protocol,
    write_config,
)
from genrec.client import protocol
from genrec.training.checkpoint import load_checkpoint
from genrec.training.hstu import HSTU, HSTUConfig
from genrec.training.retrieval import FaissConfig, build_faiss_index, save_index

CHECKPOINT_FILES = ("model.safetensors", "config.json", "vocab.json", "metrics.json")
COMPOSING = ("recommender", "user_encoder", "item_retrieval", "candidate_scorer", "top_n")
KEEP_VERSIONS = 2  # loaded versions of each composing model: the serving build and the one rolling in


BUILD_CONFIG_FILE = "build_config.json"  # in every composing model's version folder


@dataclass(frozen=True)
class BuildConfig:
    checkpoint: Path
    repository: Path = Path("model_repository")
    runtime: Literal["torch", "onnx", "tensorrt"] = "torch"
    retrieve_k: int = 100  # retrieval depth before re-ranking; the largest k a caller may ask for
    max_batch_size: int = 64  # users per batch in each composing model
    instances: int = 1
    dynamic_batching: bool = True
    max_queue_delay_us: int = 2000  # how long a request may wait for others to share its batch
    device: str = "cpu"  # cpu or cuda for the torch / onnx runtimes
    faiss: Literal["none", "ivf", "hnsw"] = "none"
    max_history_events: int = Limits.max_history_events  # per request, before truncation to max_len
    max_candidates: int = Limits.max_candidates  # per rank request
    # The user cache's budget; None: DEFAULT_USER_CACHE_MB with the torch runtime, off (0) with the others,
    # whose exported graphs cannot append events.
    user_cache_mb: float | None = None
    user_cache_ttl_s: float = 0.0  # forget a user this long after their last request; 0 = only LRU eviction
    # Histories beyond max_len lose their oldest events in blocks of this many (see window_start);
    # None: max_len // 8, so a cached user is recomputed once per that many new events.
    window_block: int | None = None
    threads: int = 0  # torch threads per served model process; 0 = torch's default (one per core)

    def __post_init__(self) -> None:
        self.limits  # noqa: B018  (building the limits checks them: a bad value fails before any work)
        if self.user_cache_mb is not None and self.user_cache_mb > 0 and self.runtime != "torch":
            raise ValueError(f"the user cache needs runtime='torch' (got {self.runtime!r}): set user_cache_mb=0")
        if (self.user_cache_mb or 0) < 0 or self.user_cache_ttl_s < 0 or self.threads < 0:
            raise ValueError("user_cache_mb, user_cache_ttl_s and threads must be >= 0")
        if self.window_block is not None and self.window_block < 1:
            raise ValueError(f"window_block must be >= 1, got {self.window_block}")

    @property
    def cache_mb(self) -> float:
        if self.user_cache_mb is not None:
            return self.user_cache_mb
        return DEFAULT_USER_CACHE_MB if self.runtime == "torch" else 0.0

    def block(self, max_len: int) -> int:
        return self.window_block if self.window_block is not None else max(1, max_len // 8)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_history_events, self.max_candidates, max_k=self.retrieve_k)


def _ragged(name: str, dtype: str, dims: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, dtype, dims, allow_ragged_batch=True)


def _history_inputs() -> tuple[TensorSpec, ...]:
    return tuple(tensor_from_protocol(t, allow_ragged_batch=True) for t in protocol.HISTORY_INPUTS)


def _cache_tensors(config: HSTUConfig) -> tuple[TensorSpec, ...]:
    layers, heads = config.num_layers, config.num_heads
    return (
        _ragged(h.USER_EMBEDDING, "FP32", (config.d_model,)),
        _ragged(h.KV_KEYS, "FP32", (layers, -1, heads * config.d_qk)),
        _ragged(h.KV_VALUES, "FP32", (layers, -1, heads * config.d_v)),
        _ragged(h.KV_TIMESTAMPS, "INT64", (-1,)),
    )


def _scalar_input(t: protocol.Tensor) -> TensorSpec:
    return tensor_from_protocol(t)


def model_specs(config: HSTUConfig, build: BuildConfig, version: int) -> list[ModelSpec | EnsembleSpec]:
    """The typed description of every model of build ``version``.

    Rollout without mixing: every ensemble step pins the composing model's ``version``, and composing
    models keep their two newest versions loaded, so while a server moves to a new build (`genrec rollout`:
    composing models first, then the ensembles, each switching at once) every request runs on one build.
    """
    batching = DynamicBatching(build.max_queue_delay_us) if build.dynamic_batching else None
    instance_kind = "KIND_GPU" if build.device.startswith("cuda") else "KIND_CPU"
    groups = (InstanceGroup(build.instances, instance_kind),)
    runtime = build.runtime
    common = {**build.limits.as_parameters(), "window_block": str(build.block(config.max_len)),
              "threads": str(build.threads)}

    def python_model(name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], **params: str) -> ModelSpec:
        return ModelSpec(
            name=name, inputs=inputs, outputs=outputs, max_batch_size=build.max_batch_size,
            dynamic_batching=batching, instance_groups=groups, version_policy_latest=KEEP_VERSIONS,
            parameters={"handler": name, "runtime": runtime, "device": build.device, **common, **params},
        )

    cache = _cache_tensors(config)
    outputs_as_inputs = tuple(TensorSpec(t.name, t.dtype, t.dims) for t in cache)
    report = protocol.HISTORY_REPORT
    retrieved = (_ragged(h.RETRIEVED_ITEM_IDS, "INT64", (-1,)), _ragged(h.RETRIEVED_SCORES, "FP32", (-1,)))
    k, exclude = (_scalar_input(t) for t in protocol.TOP_K_INPUTS)
    candidate_ids = _ragged(protocol.CANDIDATE_ITEM_IDS, "INT64", (-1,))
    # k is an optional encoder input only so that retrieve over the limit costs no prefill; the recommender
    # serves recommend (k, exclude_seen) and rank (the candidates), each with an optional user id.
    optional_k, optional_exclude, optional_candidates = (replace(t, optional=True) for t in (k, exclude, candidate_ids))
    encoder = python_model("user_encoder", _history_inputs() + (optional_k,),
                           outputs_as_inputs + tuple(tensor_from_protocol(t) for t in report))
    retrieval = python_model(
        "item_retrieval",
        (cache[0], _ragged(protocol.HISTORY_ITEM_IDS, "INT64", (-1,)), exclude),
        tuple(TensorSpec(t.name, t.dtype, t.dims) for t in retrieved),
    )
    scorer = python_model(
        "candidate_scorer",
        (*cache, candidate_ids),
        (TensorSpec(protocol.SCORES, "FP32", (-1,)),),
    )
    top_n = python_model(
        "top_n",
        (retrieved[0], _ragged(h.CANDIDATE_SCORES, "FP32", (-1,)), k),
        (TensorSpec(protocol.ITEM_IDS, "INT64", (-1,)), TensorSpec(protocol.SCORES, "FP32", (-1,))),
    )
    recommender = replace(
        python_model(
            "recommender",
            _history_inputs() + (optional_k, optional_exclude, optional_candidates,
                                 tensor_from_protocol(protocol.USER_ID_INPUT)),
            tuple(tensor_from_protocol(t) for t in protocol.ENDPOINTS[protocol.RECOMMEND].outputs),
            user_cache_mb=str(build.cache_mb), user_cache_ttl_s=str(build.user_cache_ttl_s),
        ),
        # One instance owns the cache; it computes one user at a time, so waiting for company buys nothing:
        # its batch is whatever queued while the last one ran.
        instance_groups=(InstanceGroup(1 if build.cache_mb else build.instances, instance_kind),),
        dynamic_batching=DynamicBatching(0) if build.dynamic_batching else None,
    )
    history = {t.name: t.name for t in protocol.HISTORY_INPUTS}
    report_map = {t.name: t.name for t in report}
    # An ensemble must consume every tensor its steps map, so each one maps only what it uses.
    encode_user_only = EnsembleStep("user_encoder", {**history, protocol.K: protocol.K},
                                    {h.USER_EMBEDDING: h.USER_EMBEDDING, **report_map})

    def ensemble(name: str, steps: tuple[EnsembleStep, ...]) -> EnsembleSpec:
        endpoint = protocol.ENDPOINTS[name]
        return EnsembleSpec(
            name=name,
            inputs=tuple(tensor_from_protocol(t) for t in endpoint.inputs),
            outputs=tuple(tensor_from_protocol(t) for t in endpoint.outputs),
            max_batch_size=build.max_batch_size,
            steps=tuple(replace(step, model_version=version) for step in steps),
        )

    retrieve_step = EnsembleStep(
        "item_retrieval",
        {h.USER_EMBEDDING: h.USER_EMBEDDING, protocol.HISTORY_ITEM_IDS: protocol.HISTORY_ITEM_IDS,
         protocol.EXCLUDE_SEEN: protocol.EXCLUDE_SEEN},
        {h.RETRIEVED_ITEM_IDS: h.RETRIEVED_ITEM_IDS, h.RETRIEVED_SCORES: h.RETRIEVED_SCORES},
    )

    def fused(endpoint: str) -> EnsembleStep:
        names = protocol.ENDPOINTS[endpoint]
        return EnsembleStep("recommender", {t.name: t.name for t in names.inputs}, {t.name: t.name for t in names.outputs})

    recommend = ensemble(protocol.RECOMMEND, (fused(protocol.RECOMMEND),))
    retrieve = ensemble(protocol.RETRIEVE, (
        encode_user_only,
        retrieve_step,
        EnsembleStep("top_n", {h.RETRIEVED_ITEM_IDS: h.RETRIEVED_ITEM_IDS, h.CANDIDATE_SCORES: h.RETRIEVED_SCORES,
                               protocol.K: protocol.K},
                     {protocol.ITEM_IDS: protocol.ITEM_IDS, protocol.SCORES: protocol.SCORES}),
    ))
    rank = ensemble(protocol.RANK, (fused(protocol.RANK),))
    return [recommender, encoder, retrieval, scorer, top_n, recommend, rank, retrieve]


def next_version(repository: Path) -> int:
    """One more than the newest version of any model already in the repository."""
    versions = [int(p.name) for p in repository.glob("*/*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _install_model_py(version_dir: Path) -> None:
    """The served ``model.py``, with its bytecode compiled now: the Python stub's interpreter ignores
    PYTHONDONTWRITEBYTECODE, and a ``__pycache__`` it wrote at load would look to ``--model-control poll``
    like a new version of the model (loaded twice). A stub of another Python version than this one still
    writes its own; the server image compiles the repository for its Python (docker/Dockerfile)."""
    target = version_dir / "model.py"
    shutil.copy2(Path(__file__).with_name("triton_model.py"), target)
    py_compile.compile(str(target), cfile=importlib.util.cache_from_source(str(target)), doraise=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links keep a repository of several models and versions from copying a big table many times."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_repository(build: BuildConfig) -> int:
    """Write every model of the repository as a new version; returns the version number."""
    model, meta = load_checkpoint(build.checkpoint)
    if not isinstance(model, HSTU):
        raise ValueError(f"{build.checkpoint}: only HSTU checkpoints can be served (got {meta.model_type})")
    h.Catalogue.from_meta(meta)  # fails early on string ids
    if not 0 < build.retrieve_k <= len(meta.item_raw_ids):
        raise ValueError(f"retrieve_k={build.retrieve_k} must be in 1..{len(meta.item_raw_ids)} (the catalogue size)")
    repository = Path(build.repository)
    repository.mkdir(parents=True, exist_ok=True)
    version = next_version(repository)
    staging = repository / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    artifacts = _write_artifacts(model, build, staging / "artifacts")
    for spec in model_specs(model.config, build, version):
        write_config(spec, staging / spec.name)
        version_dir = staging / spec.name / str(version)
        version_dir.mkdir(parents=True)
        if spec.name in COMPOSING:
            _install_model_py(version_dir)
            for source in artifacts.rglob("*"):
                if source.is_file():
                    _link_or_copy(source, version_dir / source.relative_to(artifacts))
    # Move into place model by model, composing models before the ensembles pinned to them; older versions
    # stay beside.
    order = {name: i for i, name in enumerate(COMPOSING)}
    built = sorted((p for p in staging.iterdir() if p.name != "artifacts"), key=lambda p: (order.get(p.name, 99), p.name))
    for model_dir in built:
        target = repository / model_dir.name
        target.mkdir(exist_ok=True)
        shutil.move(str(model_dir / str(version)), str(target / str(version)))
        shutil.move(str(model_dir / "config.pbtxt"), str(target / "config.pbtxt"))
    shutil.rmtree(staging)
    return version


def _write_artifacts(model: HSTU, build: BuildConfig, out: Path) -> Path:
    """What every composing model's version folder holds: the checkpoint, the item table, runtime files
    (``onnx/`` for onnx and tensorrt, ``tensorrt/`` plans for tensorrt)."""
    if build.runtime == "tensorrt":  # before anything is written: no half-built version is left behind
        from genrec.builders.tensorrt_build import tensorrt_available

        ok, reason = tensorrt_available()
        if not ok:
            raise RuntimeError(f"runtime='tensorrt' needs TensorRT and a CUDA GPU on the build machine: {reason}")
    for name in CHECKPOINT_FILES:
        source = Path(build.checkpoint) / name
        if source.exists():
            _link_or_copy(source, out / "checkpoint" / name)
    with torch.no_grad():
        table = model.item_table().numpy().astype(np.float32)
    np.save(out / "item_table.npy", table)
    # How this version was built, beside what it serves (paths as given; None = the documented default).
    recorded = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(build).items()}
    (out / BUILD_CONFIG_FILE).write_text(json.dumps(recorded, indent=2))
    if build.faiss != "none":
        save_index(build_faiss_index(table, FaissConfig(kind=build.faiss)), out / "item_index.faiss")
    if build.runtime in ("onnx", "tensorrt"):
        from genrec.builders.onnx_export import export_onnx

        onnx_files = export_onnx(Path(build.checkpoint), out / "onnx")
        if build.runtime == "tensorrt":
            from genrec.builders.tensorrt_build import TensorRTConfig, build_engines

            # Histories reach the engines truncated to max_len; batches above max_batch_size and candidate
            # lists above max_candidates are split by TensorRTRuntime. retrieve_k is what recommend scores.
            max_len, max_batch = model.config.max_len, build.max_batch_size
            defaults = TensorRTConfig()
            config = TensorRTConfig(
                max_batch=max_batch,
                max_len=max_len,
                max_candidates=max(defaults.max_candidates, build.retrieve_k),
                opt_batch=min(defaults.opt_batch, max_batch),
                opt_len=min(defaults.opt_len, max_len),
                opt_candidates=build.retrieve_k,
            )
            build_engines(onnx_files, out / "tensorrt", config)
    return out
