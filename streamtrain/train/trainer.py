"""The step-based training loop, the same for every phase (the task supplies model, loss, eval).

    while step < max_steps:
        grad_accum_steps x (next batch -> loss -> backward);  clip;  optimizer + scheduler step
        log / evaluate / checkpoint when their step intervals say so

Everything that a resume needs is state: Accelerate's ``save_state`` carries model, optimizer,
scheduler, scaler and RNGs (DeepSpeed's own checkpoint under ZeRO); the trainer counters and
each rank's data-stream position are versioned JSON beside them. Nothing is re-read to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs, set_seed
from accelerate.utils import load as load_checkpoint_file
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

from streamtrain.config import RunConfig
from streamtrain.data.loader import StreamLoader
from streamtrain.data.pipeline import held_out_batches, resolve_sources, train_loader
from streamtrain.distributed import all_reduce_sum
from streamtrain.train import checkpoint
from streamtrain.train.optim import build_optimizer, build_scheduler
from streamtrain.train.task import Task
from streamtrain.train.tracking import JsonlTracker, accelerate_trackers

TRAINER_STATE = "trainer_state.json"
DATA_STATE_DIR = "data"
CONFIG_FILE = checkpoint.CONFIG_FILE
WEIGHTS_FILE = checkpoint.WEIGHTS_FILE


class TrainingError(RuntimeError):
    """A run that cannot start or continue as configured (reported without a traceback)."""


class Trainer:
    """Runs one phase from a resolved config until ``train.max_steps``."""

    def __init__(self, config: RunConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.output_dir = Path(config.output_dir)
        self.accelerator = _build_accelerator(config, self.output_dir)
        self.step = 0
        self.samples_seen = 0
        self.best: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}
        self.best_metric, self.best_mode = (
            (config.checkpoint.best_metric, config.checkpoint.best_mode)
            if config.checkpoint.best_metric
            else task.best_metric()
        )
        self.jsonl: JsonlTracker | None = None
        self._stand_in: dict[str, Any] | None = None
        """The last batch this rank trained on (see _backward_without_data)."""
        # DeepSpeed's own bf16/fp16 (when a config enables it explicitly) keeps the weights in half
        # precision and disables autocast in its engine, so floating inputs must arrive in it.
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
        ds_config = ds.deepspeed_config if ds is not None else {}
        half = [name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled") is True]
        self._input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[half[0]] if half else None

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        acc, config = self.accelerator, self.config
        # Data sources first: a typo in a path should fail in a second, not after model loading.
        self.train_data = resolve_sources(config.data.train)
        self.eval_data = resolve_sources(config.data.eval) if config.data.eval else None
        resume_from = self._resume_checkpoint()
        set_seed(config.train.seed)
        model = self.task.build_model()
        # Optional task hook: a model with self-placing parts (bitsandbytes-quantized weights go to
        # their device as they load) is moved by its task; Accelerate's blanket .to() would move them too.
        placed = self.task.place_model(model, acc.device)
        optimizer = build_optimizer(model, config.train)
        scheduler = build_scheduler(optimizer, config.train)
        placement = {"device_placement": [False, None, None]} if placed and not config.train.deepspeed else {}
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler, **placement)
        self.train_loader = self._train_loader()
        if resume_from is not None:
            self._load(resume_from)
        else:
            self.train_loader.start_fresh()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / CONFIG_FILE).write_text(config.to_yaml())
            self.jsonl = JsonlTracker(self.output_dir, self.step) if "jsonl" in config.log.trackers else None
        acc.init_trackers(config.log.project, config={"output_dir": config.output_dir})

    def _resume_checkpoint(self) -> Path | None:
        resume, output = self.config.train.resume, self.output_dir
        if output.exists() and not output.is_dir():
            raise TrainingError(f"output_dir: {output} exists and is not a directory")
        if resume == "none":
            if checkpoint.latest_complete(output) is not None:
                raise TrainingError(
                    f"{output} already holds checkpoints and train.resume=none: pick another output_dir, "
                    "or train.resume=auto to continue that run"
                )
            return None
        if resume == "auto":
            if self.accelerator.is_main_process:
                checkpoint.remove_stale(output)
            self.accelerator.wait_for_everyone()
            found = checkpoint.latest_complete(output)
        else:
            found = Path(resume)
            if not checkpoint.is_complete(found):
                raise TrainingError(
                    f"train.resume={resume}: not a complete checkpoint (no {checkpoint.MARKER})"
                )
        if found is not None:
            self._check_same_run(found)
        return found

    def _check_same_run(self, found: Path) -> None:
        try:
            saved = yaml.safe_load((found / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot read the config saved in {found}: {exc}") from None
        now = self.config.to_dict()
        changed = [
            f"{section}: saved {saved.get(section)!r}, now {now[section]!r}"
            for section in ("task", "model")
            if saved.get(section) != now[section]
        ]
        if changed:
            raise TrainingError(
                f"{found} is a checkpoint of a different model ({'; '.join(changed)}). "
                "Use another output_dir, or train.resume=none in a fresh one."
            )

    def _train_loader(self) -> StreamLoader:
        acc, config = self.accelerator, self.config
        return train_loader(
            config.data,
            self.train_data,
            rank=acc.process_index,
            world_size=acc.num_processes,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            decode=self.task.decoder(train=True),
            collate=self.task.collate,
            batches_per_step=config.train.grad_accum_steps,
            pin_memory=acc.device.type == "cuda",
        )

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps`` (continuing a checkpoint if there is one); final eval metrics."""
        self._setup()
        acc, config = self.accelerator, self.config
        max_steps = config.train.max_steps
        if self.step >= max_steps:
            self._print(f"already trained to step {self.step} (train.max_steps={max_steps}); nothing to do")
            self._finish()
            return self.last_eval
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (acc.is_main_process and config.log.progress_bar),
        )
        window = _Window()
        self.model.train()
        while self.step < max_steps:
            loss, extras = self._train_step(window)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.step % config.log.every_steps == 0 or self.step == max_steps:
                self._log_train(window, extras)
                window = _Window()
            evaluate_now = self.eval_data is not None and (
                self.step == max_steps
                or (config.eval.every_steps and self.step % config.eval.every_steps == 0)
            )
            if evaluate_now:
                self._evaluate()
            every = config.checkpoint.every_steps
            if self.step == max_steps or (every and self.step % every == 0):
                self.save_checkpoint()
        bar.close()
        self._finish()
        return self.last_eval

    def _train_step(self, window: _Window) -> tuple[float, dict[str, float]]:
        acc, device = self.accelerator, self.accelerator.device
        started = time.perf_counter()
        losses, extras = [], {}
        for _ in range(self.config.train.grad_accum_steps):
            waited = time.perf_counter()
            # A loader (re)starting draws its worker seed from the global RNG, at step 0 or at the
            # resumed step: isolated, the RNG stream training sees (dropout) is the same either way.
            with torch.random.fork_rng(devices=[]):
                batch = next(self.train_loader)
            window.data_wait += time.perf_counter() - waited
            with acc.accumulate(self.model):
                if batch is None:
                    self._backward_without_data()
                else:
                    batch = _to_device(batch, device, self._input_dtype)
                    window.samples += _batch_size(batch)
                    self.samples_seen += _batch_size(batch) * acc.num_processes
                    loss, extras = self.task.loss(self.model, batch, self.step)
                    acc.backward(loss)
                    losses.append(loss.detach().float().item())
                    self._stand_in = batch
                if acc.sync_gradients:
                    window.grad_norm = self._clip()
                self.optimizer.step()
                if acc.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        step_loss = sum(losses) / len(losses) if losses else math.nan
        if losses:
            window.losses.append(step_loss)
        window.elapsed += time.perf_counter() - started
        return step_loss, extras

    def _backward_without_data(self) -> None:
        """This rank's micro-batch had no readable sample: keep every rank in the same step.

        Alone, the micro-batch is simply passed over. Under DDP or DeepSpeed every rank must run
        forward and backward for the gradient exchange, so the rank repeats its last batch with
        the loss weighted by zero, in eval mode so that normalisation statistics stay untouched.
        """
        acc = self.accelerator
        if acc.num_processes == 1 and not self.config.train.deepspeed:
            return
        if self._stand_in is None:
            raise TrainingError(
                f"rank {acc.process_index}: no sample of its first batch since the start could be read "
                "(see the warnings about unreadable shards above), so it has no batch to take part in "
                "the gradient exchange with; restore those shards and resume"
            )
        self.model.eval()
        loss, _ = self.task.loss(self.model, self._stand_in, self.step)
        self.model.train()
        acc.backward(loss * 0.0)

    def _clip(self) -> float | None:
        max_norm = self.config.train.max_grad_norm
        if max_norm is None and self.config.train.deepspeed is None:
            return None
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm or float("inf"))
        return None if norm is None else float(norm)

    # -- logging and evaluation ----------------------------------------------------------------

    def _log_train(self, window: _Window, extras: dict[str, float]) -> None:
        acc = self.accelerator
        totals = all_reduce_sum(
            {
                "loss": sum(window.losses),
                "steps": len(window.losses),
                "samples": window.samples,
                "data_wait": window.data_wait,
                "elapsed": window.elapsed,
                **{f"data/{key}": value for key, value in self.train_loader.read_stats.items()},
            }
        )
        ranks = acc.num_processes
        metrics = {
            "train/loss": totals.pop("loss") / max(1.0, totals.pop("steps")),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_s": totals["samples"] / max(1e-9, totals["elapsed"] / ranks),
            "train/data_wait_fraction": totals["data_wait"] / max(1e-9, totals["elapsed"]),
            "train/epoch": self.train_loader.epoch,
            **{f"train/{key}": value for key, value in extras.items()},
            **{key: value for key, value in totals.items() if key.startswith("data/")},
        }
        if window.grad_norm is not None:
            metrics["train/grad_norm"] = window.grad_norm
        self._log(metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process and self.jsonl is not None:
            self.jsonl.log(metrics, step=self.step)

    def _evaluate(self) -> dict[str, float]:
        assert self.eval_data is not None
        config, acc = self.config, self.accelerator
        read_stats: Counter[str] = Counter()
        held_out = held_out_batches(
            config.data,
            config.eval,
            self.eval_data,
            rank=acc.process_index,
            world_size=acc.num_processes,
            decode=self.task.decoder(train=False),
            collate=self.task.collate,
        )

        def batches():
            for batch, stats in held_out:
                read_stats.update(stats)
                if batch is not None:
                    yield _to_device(batch, acc.device, self._input_dtype)

        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model, batches())
        self.model.train()
        skipped = all_reduce_sum({k: float(v) for k, v in read_stats.items() if k != "samples"})
        metrics = {**metrics, **{f"eval/data/{k}": v for k, v in skipped.items()}}
        self.last_eval = metrics
        self._log({key if "/" in key else f"eval/{key}": value for key, value in metrics.items()})
        self._print(f"step {self.step}: " + self.task.summary(metrics))
        self._update_best(metrics)
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> None:
        if self.best_metric not in metrics:
            raise TrainingError(
                f"checkpoint.best_metric: evaluation has no {self.best_metric!r}; "
                f"it reports {', '.join(sorted(metrics))}"
            )
        value = metrics[self.best_metric]
        if not math.isfinite(value):
            return
        previous = self.best.get("value")
        better = previous is None or (value > previous if self.best_mode == "max" else value < previous)
        if not better:
            return
        self.best = {"metric": self.best_metric, "value": value, "step": self.step}
        acc = self.accelerator
        weights = acc.get_state_dict(self.model)  # a collective under ZeRO-3: every rank calls it
        if acc.is_main_process:
            staging = self.output_dir / f"{checkpoint.TMP_PREFIX}{checkpoint.BEST}"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            self._write_weights(weights, staging)
            (staging / CONFIG_FILE).write_text(self.config.to_yaml())
            checkpoint.write_json_atomic(staging / "metrics.json", {"step": self.step, **metrics})
            checkpoint.replace_dir(staging, self.output_dir / checkpoint.BEST)
        acc.wait_for_everyone()

    def _write_weights(self, weights: dict[str, torch.Tensor], directory: Path) -> None:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"step": str(self.step)})
        self.task.save_artifacts(self.accelerator.unwrap_model(self.model), directory)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "best": self.best,
            "last_eval": self.last_eval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise TrainingError(f"unknown trainer state version {state.get('version')!r}")
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.best = dict(state.get("best") or {})
        self.last_eval = dict(state.get("last_eval") or {})

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        staging = self.output_dir / f"{checkpoint.TMP_PREFIX}{checkpoint.step_dir_name(self.step)}"
        try:
            self._write_checkpoint(staging)
        except (OSError, RuntimeError, SafetensorError) as exc:
            # A full disk, a quota, an I/O error: say where and why instead of a traceback, and
            # free what the partial write took; the previous complete checkpoint stays the resume point.
            raise checkpoint.discard_failed_write(staging, self.output_dir, self.step, exc) from exc
        if acc.is_main_process:
            checkpoint.rotate(
                self.output_dir, self.config.checkpoint.keep_last, self.config.checkpoint.keep_every_steps
            )
        acc.wait_for_everyone()
        return self.output_dir / checkpoint.step_dir_name(self.step)

    def _write_checkpoint(self, staging: Path) -> None:
        """Every rank's state into ``staging``, then published as this step's checkpoint."""
        acc = self.accelerator
        if acc.is_main_process:
            checkpoint.staging_dir(self.output_dir, self.step).mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging), safe_serialization=True)
        (staging / DATA_STATE_DIR).mkdir(exist_ok=True)
        checkpoint.write_json_atomic(
            staging / DATA_STATE_DIR / f"rank-{acc.process_index:05d}.json", self.train_loader.state_dict()
        )
        weights = acc.get_state_dict(self.model) if self.config.train.deepspeed else None
        if acc.is_main_process:
            if weights is not None:  # DeepSpeed keeps its own sharded format; add plain weights
                self._write_weights(weights, staging)
            else:
                self.task.save_artifacts(acc.unwrap_model(self.model), staging)
            (staging / CONFIG_FILE).write_text(self.config.to_yaml())
            checkpoint.write_json_atomic(staging / TRAINER_STATE, self.state_dict())
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoint.publish(staging, self.output_dir, self.step)

    def _load(self, directory: Path) -> None:
        acc = self.accelerator
        data_state = directory / DATA_STATE_DIR / f"rank-{acc.process_index:05d}.json"
        if not data_state.exists():
            raise TrainingError(
                f"{directory} holds no data-stream state for rank {acc.process_index}: it was saved by "
                "a run with fewer processes. Resume with the original number of processes."
            )
        try:
            # Accelerate unpickles with weights_only=True, which refuses anything but tensors and
            # plain values, yet it passes over a random-state file it cannot load in silence: load
            # that one first, so a refused file always stops the resume.
            rng_state = directory / f"random_states_{acc.process_index}.pkl"
            if rng_state.exists():
                load_checkpoint_file(rng_state)
            with _weights_only_loads(deepspeed=bool(self.config.train.deepspeed)):
                acc.load_state(str(directory))
        except pickle.UnpicklingError as exc:
            named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            why = f"it names {named.group(1)}" if named else "it holds more than tensors and plain values"
            raise TrainingError(
                f"{directory} holds a file that is not a plain tensor checkpoint ({why}); refusing to "
                "unpickle it, as that could run code. Resume from a checkpoint you trust."
            ) from None
        self.load_state_dict(json.loads((directory / TRAINER_STATE).read_text()))
        self.train_loader.load_state_dict(json.loads(data_state.read_text()))
        self._print(f"resumed from {directory} at step {self.step}")

    def _finish(self) -> None:
        acc = self.accelerator
        self.train_loader.shutdown()
        if acc.is_main_process:
            if self.last_eval:
                (self.output_dir / "final_metrics.json").write_text(
                    json.dumps({"step": self.step, **self.last_eval}, indent=2) + "\n"
                )
            if self.jsonl is not None:
                self.jsonl.finish()
        acc.wait_for_everyone()
        # Ends the trackers and destroys the process group: without that, ZeRO-2 sometimes
        # aborts at interpreter exit (see ENVIRONMENT.md).
        acc.end_training()

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)


class _Window:
    """Counters of the steps since the last log line."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = 0
        self.data_wait = 0.0
        self.elapsed = 0.0
        self.grad_norm: float | None = None


def _build_accelerator(config: RunConfig, output_dir: Path) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = config.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    group: dict[str, Any] = {"timeout": timedelta(seconds=config.train.collective_timeout_s)}
    plugin = None
    if config.train.deepspeed:
        _single_process_group_env()
        plugin = DeepSpeedPlugin(hf_ds_config=_deepspeed_config(config, precision))
        precision = "no"  # DeepSpeed's config carries the precision (see _deepspeed_config)
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


def _deepspeed_config(config: RunConfig, precision: str) -> dict[str, Any]:
    """The recipe's DeepSpeed JSON with its "auto" values filled from the train section."""
    path = Path(config.train.deepspeed or "")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingError(f"train.deepspeed: {path} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise TrainingError(f"train.deepspeed: {path} must hold a JSON object, got {type(ds).__name__}")
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


def _to_device(
    batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Tensors onto ``device``; floating ones also to ``dtype`` when given."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def _batch_size(batch: dict[str, Any]) -> int:
    ids = batch.get("sample_ids")
    return len(ids) if ids is not None else 0
