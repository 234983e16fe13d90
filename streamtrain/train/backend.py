"""Accelerate and DeepSpeed: building the accelerator, wrapping the model, and the model's part
of a checkpoint (the ``ModelState`` the checkpoint manager is handed).

One process, DDP over gloo or NCCL, or DeepSpeed ZeRO: the loop sees the same ``Backend``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs
from accelerate.utils import load as load_checkpoint_file
from safetensors.torch import save_file
from torch import nn

from streamtrain import console
from streamtrain.config import RunConfig
from streamtrain.errors import UserError
from streamtrain.train.checkpoint import WEIGHTS_FILE
from streamtrain.train.tracking import accelerate_trackers


class Backend:
    """The accelerator of one run and the model, optimizer and scheduler it prepared."""

    def __init__(self, config: RunConfig, output_dir: Path) -> None:
        self.deepspeed = bool(config.train.deepspeed)
        quiet = console.stdout_to_log("deepspeed") if self.deepspeed else contextlib.nullcontext()
        with quiet:  # DeepSpeed prints "... built successfully" each time it starts its comm op
            self.accelerator = build_accelerator(config, output_dir)
        self.model: Any = None
        # DeepSpeed's own bf16/fp16 (when a config enables it explicitly) keeps the weights in half
        # precision and disables autocast in its engine, so floating inputs must arrive in it.
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        ds_config = plugin.deepspeed_config if plugin is not None else {}
        half = [name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled") is True]
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[half[0]] if half else None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model: nn.Module, optimizer: Any, scheduler: Any, placed: bool) -> tuple[Any, Any, Any]:
        """Wrap for training; ``placed``: the task put the model on the device itself."""
        placement = {"device_placement": [False, None, None]} if placed and not self.deepspeed else {}
        self.model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler, **placement)
        return self.model, optimizer, scheduler

    def prepare_for_eval(self, model: nn.Module, placed: bool) -> nn.Module:
        """Wrap for evaluation only (no DDP, no optimizer): autocast and device as in training."""
        self.model = self.accelerator.prepare_model(model, device_placement=not placed, evaluation_mode=True)
        return self.model

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors onto the device; floating ones also into DeepSpeed's explicit half precision."""
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if self.input_dtype is not None and value.is_floating_point():
                    value = value.to(self.input_dtype)
            moved[key] = value
        return moved

    # -- the ModelState of a checkpoint --------------------------------------------------------

    def save(self, directory: Path, step: int) -> None:
        acc = self.accelerator
        # Accelerate writes the unwrapped weights as model.safetensors, optimizer, scheduler and
        # every rank's RNG; DeepSpeed keeps its own sharded format, so plain weights are added.
        acc.save_state(str(directory), safe_serialization=True)
        if self.deepspeed:
            self.save_weights(directory, step)

    def save_weights(self, directory: Path, step: int) -> None:
        weights = self.accelerator.get_state_dict(self.model)  # a collective under ZeRO-3
        if self.accelerator.is_main_process:
            tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
            save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"step": str(step)})

    def load(self, directory: Path) -> None:
        acc = self.accelerator
        saved = len(list(directory.glob("random_states_*.pkl")))
        if self.deepspeed and saved and saved != acc.num_processes:
            raise UserError(
                f"{directory} was saved by {saved} DeepSpeed processes and this run has "
                f"{acc.num_processes}: DeepSpeed's optimizer state is partitioned per process, so "
                f"resume it on {saved} processes (the data stream itself resumes on any number; "
                "without train.deepspeed the whole checkpoint does)"
            )
        # Accelerate unpickles with weights_only=True, which refuses anything but tensors and
        # plain values, yet it passes over a random-state file it cannot load in silence: load
        # that one first, so a refused file always stops the resume.
        rng_state = directory / f"random_states_{acc.process_index}.pkl"
        if rng_state.exists():
            load_checkpoint_file(rng_state)
        with _weights_only_loads(deepspeed=self.deepspeed):
            acc.load_state(str(directory))


def build_accelerator(config: RunConfig, output_dir: Path) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = config.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    group: dict[str, Any] = {"timeout": timedelta(seconds=config.train.collective_timeout_s)}
    plugin = None
    if config.train.deepspeed:
        _single_process_group_env()
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(config, precision))
        precision = "no"  # DeepSpeed's config carries the precision (see deepspeed_config)
        if not cuda:  # DeepSpeed on CPU needs gloo named explicitly (see ENVIRONMENT.md)
            group["backend"] = "gloo"
    return Accelerator(
        # Without DeepSpeed, CPU processes must say so to run DDP on gloo (see ENVIRONMENT.md);
        # with it they must not, or Accelerate silently drops DeepSpeed.
        cpu=not cuda and plugin is None,
        gradient_accumulation_steps=config.train.grad_accum_steps,
        mixed_precision=precision,
        deepspeed_plugin=plugin,
        log_with=accelerate_trackers(config.log.trackers, output_dir) or None,
        project_dir=str(output_dir),
        kwargs_handlers=[InitProcessGroupKwargs(**group)],
        step_scheduler_with_optimizer=False,
    )


def _single_process_group_env() -> None:
    """DeepSpeed needs a process group even alone: give a launcher-less process the env of one."""
    if "WORLD_SIZE" in os.environ:
        return  # started by torchrun / accelerate launch
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    os.environ.update(env)


@contextlib.contextmanager
def _weights_only_loads(deepspeed: bool) -> Iterator[None]:
    """Every ``torch.load`` inside unpickles tensors and plain values only, never code.

    Accelerate loads with ``weights_only=True`` already; DeepSpeed loads its own files with
    ``weights_only=False``. Inside this block torch is told to ignore that (its
    TORCH_FORCE_WEIGHTS_ONLY_LOAD switch), with the few plain DeepSpeed types its optimizer
    state holds allowed by name.
    """
    if not deepspeed:
        yield
        return
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        plain_types = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
        with torch.serialization.safe_globals(plain_types):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def deepspeed_config(config: RunConfig, precision: str) -> dict[str, Any]:
    """The recipe's DeepSpeed JSON with its "auto" values filled from the train section."""
    path = Path(config.train.deepspeed or "")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"train.deepspeed: {path} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise UserError(f"train.deepspeed: {path} must hold a JSON object, got {type(ds).__name__}")
    train = config.train
    fill = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm or 0.0,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    half = precision in ("bf16", "fp16")
    explicit = [name for name in ("bf16", "fp16") if ds.get(name, {}).get("enabled") is True]
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = False
    if half and not explicit and "torch_autocast" not in ds:
        # torch autocast inside the engine, fp32 master weights: DeepSpeed's own bf16 mode casts
        # parameters but not BatchNorm's running statistics, which breaks conv backbones.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return ds
