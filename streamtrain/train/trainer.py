"""The step-based training loop, the same for every phase (the task supplies model, loss, eval).

    while step < max_steps:
        grad_accum_steps x (next batch -> loss -> backward);  clip;  optimizer + scheduler step
        log / evaluate / checkpoint when their step intervals say so

The loop holds no checkpoint logic of its own: it is one ``Stateful`` part (its counters) that
the CheckpointManager saves beside the data loader's position and the backend's model state.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from streamtrain import console
from streamtrain.config import RunConfig
from streamtrain.data.eval import EvalReader
from streamtrain.data.loader import ElasticLoader
from streamtrain.data.pipeline import decode_device, held_out_reader, resolve_sources, train_loader
from streamtrain.errors import TrainingError, UserError
from streamtrain.train import stopping
from streamtrain.train.backend import Backend
from streamtrain.train.checkpoint import CONFIG_FILE
from streamtrain.train.checkpoint_manager import CheckpointManager
from streamtrain.train.claim import OutputClaim, claim_output
from streamtrain.train.evaluation import evaluate_sources, held_out
from streamtrain.train.optim import build_optimizer, build_scheduler
from streamtrain.train.task import Decode, Task
from streamtrain.train.tracking import JsonlTracker, StepWindow

STATE_VERSION = 1


class Trainer:
    """Runs one phase from a resolved config until ``train.max_steps``."""

    def __init__(self, config: RunConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.output_dir = Path(config.output_dir)
        self.backend = Backend(config, self.output_dir)
        self.step = 0
        self.samples_seen = 0
        self.last_eval: dict[str, float] = {}
        self.jsonl: JsonlTracker | None = None
        self._stand_in: dict[str, Any] | None = None
        """The last batch this rank trained on (see _backward_without_data)."""
        self.stops = stopping.StopRequests()
        self.claim: OutputClaim | None = None
        """This job's claim on output_dir (rank 0 only)."""
        self.eval_reader: EvalReader | None = None
        chosen = config.checkpoint
        self.checkpoints = CheckpointManager(
            self.output_dir,
            chosen,
            config,
            self.backend,
            global_states={"trainer": self},
            rank_states={},  # the data loader joins once it exists (see _setup)
            write_artifacts=lambda directory: task.save_artifacts(self.backend.unwrapped(), directory),
            best_metric=(chosen.best_metric, chosen.best_mode) if chosen.best_metric else task.best_metric(),
        )

    @property
    def is_main(self) -> bool:
        return self.backend.accelerator.is_main_process

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        config, backend = self.config, self.backend
        # Data sources first: a typo in a path should fail in a second, not after model loading.
        self.train_data = resolve_sources(config.data.train, "data.train")
        self.eval_data = resolve_sources(config.data.eval, "data.eval") if config.data.eval else None
        self.decode_on = decode_device(config.data, backend.device, self.train_data)
        """Where images are decoded: None in the loader workers, else this device, batch by batch."""
        # Before anything in output_dir is touched (stale folders removed, logs rewound).
        self.claim = claim_output(self.output_dir, config.train.claim_lease_s)
        resume_from = self.checkpoints.find_resume(config.train.resume)
        set_seed(config.train.seed)
        model = self.task.build_model()
        placed = self.task.place_model(model, backend.device)
        optimizer = build_optimizer(model, config.train)
        scheduler = build_scheduler(optimizer, config.train)
        self.model, self.optimizer, self.scheduler = backend.prepare(model, optimizer, scheduler, placed)
        # Its workers fork now, once (the task's collate needs the built model's tokenizer), before
        # the training loader's and the checkpoint's threads run.
        self.eval_reader = self._eval_reader() if self.eval_data is not None else None
        self.train_loader = self._train_loader()
        self.checkpoints.rank_states["data"] = self.train_loader
        if resume_from is not None:
            self.checkpoints.load(resume_from)
            self._print(f"resumed from {resume_from} at step {self.step}")
        else:
            self.train_loader.start_fresh()
        console.log_to(self.output_dir, backend.accelerator.process_index)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / CONFIG_FILE).write_text(config.to_yaml())
            self.jsonl = JsonlTracker(self.output_dir, self.step) if "jsonl" in config.log.trackers else None
        backend.accelerator.init_trackers(config.log.project, config={"output_dir": config.output_dir})

    def _train_loader(self) -> ElasticLoader:
        acc, config = self.backend.accelerator, self.config
        return train_loader(
            config.data,
            self.train_data,
            rank=acc.process_index,
            world_size=acc.num_processes,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            decode=self._decoder(train=True),
            collate=self.task.collate,
            batches_per_step=config.train.grad_accum_steps,
            pin_memory=self.backend.device.type == "cuda",
            decode_device=self.decode_on,
        )

    def _eval_reader(self) -> EvalReader:
        assert self.eval_data is not None
        acc, config = self.backend.accelerator, self.config
        return held_out_reader(
            config.data,
            config.eval,
            self.eval_data,
            rank=acc.process_index,
            world_size=acc.num_processes,
            decode=self._decoder(train=False),
            collate=self.task.collate,
            decode_device=self.decode_on,
        )

    def _decoder(self, train: bool) -> Decode:
        # Asked for bytes-only samples only when the device decodes: a task written before
        # decode_device (no on_device parameter) keeps working with workers that decode.
        if self.decode_on is None:
            return self.task.decoder(train=train)
        return self.task.decoder(train=train, on_device=True)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps`` (continuing a checkpoint if there is one); final eval metrics.

        Raises ``Stopped`` after writing the checkpoint of the step a stop signal ended.
        """
        stopping.watch_launcher()
        try:
            if self.config.train.checkpoint_on_signal:
                self.stops.install()
            self._setup()
            return self._loop()
        finally:
            self.stops.uninstall()
            if self.eval_reader is not None:
                self.eval_reader.close()
            if self.claim is not None:
                self.claim.release()

    def _loop(self) -> dict[str, float]:
        config, max_steps = self.config, self.config.train.max_steps
        if self.step >= max_steps:
            self._print(f"already trained to step {self.step} (train.max_steps={max_steps}); nothing to do")
            self._finish()
            return self.last_eval
        if signum := self._agreed_stop():  # asked to stop while setting up: nothing new to save
            self._finish()
            raise stopping.stopped_after(signum, self.step, None, 0.0)
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.is_main and config.log.progress_bar),
        )
        window = StepWindow()
        self.model.train()
        while self.step < max_steps:
            loss, extras = self._train_step(window)
            self.step += 1
            signum = self._agreed_stop()
            if self.claim is not None and self.claim.lost:
                raise TrainingError(
                    f"another run took over {self.output_dir} (this run's claim went unrenewed past "
                    f"train.claim_lease_s={config.train.claim_lease_s}); stopping without writing more"
                )
            last = self.step == max_steps
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.step % config.log.every_steps == 0 or last or signum:
                self._log_train(window, extras)
                window = StepWindow()
            # A stop skips an evaluation that is due: the grace period is for the checkpoint.
            if (
                self.eval_data is not None
                and not signum
                and (last or _every(self.step, config.eval.every_steps))
            ):
                self._evaluate()
            started = time.monotonic()
            saved = self.checkpoints.save(self.step, force=last or bool(signum))
            if signum:
                bar.close()
                self._finish(stopped=True)
                raise stopping.stopped_after(signum, self.step, saved, time.monotonic() - started)
        bar.close()
        self._finish()
        return self.last_eval

    def _agreed_stop(self) -> int:
        """The stop signal some rank received (0: none), the same on every rank."""
        return self.stops.agreed() if self.config.train.checkpoint_on_signal else 0

    def _train_step(self, window: StepWindow) -> tuple[float, dict[str, float]]:
        acc = self.backend.accelerator
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
                    batch = self.backend.to_device(batch)
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
        acc = self.backend.accelerator
        if acc.num_processes == 1 and not self.backend.deepspeed:
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
        if max_norm is None and not self.backend.deepspeed:
            return None
        norm = self.backend.accelerator.clip_grad_norm_(self.model.parameters(), max_norm or float("inf"))
        return None if norm is None else float(norm)

    # -- logging and evaluation ----------------------------------------------------------------

    def _log_train(self, window: StepWindow, extras: dict[str, float]) -> None:
        lr, epoch = self.scheduler.get_last_lr()[0], self.train_loader.epoch
        metrics = window.metrics(self.train_loader.read_stats, lr, epoch, extras)
        self._log({**metrics, **self.train_loader.source_metrics()})

    def _log(self, metrics: dict[str, float]) -> None:
        self.backend.accelerator.log(metrics, step=self.step)
        if self.jsonl is not None:
            self.jsonl.log(metrics, step=self.step)

    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics of all of ``data.eval``, and of each of its named sources apart."""
        assert self.eval_data is not None
        metrics, logged, summary = evaluate_sources(self.eval_data, self._held_out, self.task.summary)
        self.last_eval = metrics
        self._log(logged)
        self._print(f"step {self.step}: {summary}")
        self.checkpoints.update_best(self.step, metrics)
        return metrics

    def _held_out(self, part: str | None) -> dict[str, float]:
        assert self.eval_reader is not None
        return held_out(self.task, self.model, self.eval_reader, part, self.backend.to_device)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "best": self.checkpoints.best,
            "last_eval": self.last_eval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"unknown trainer state version {state.get('version')!r}")
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.checkpoints.best = dict(state.get("best") or {})
        self.last_eval = dict(state.get("last_eval") or {})

    def _finish(self, stopped: bool = False) -> None:
        acc = self.backend.accelerator
        self.train_loader.shutdown()
        if self.is_main and self.last_eval and not stopped:
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
        if self.is_main:
            tqdm.write(message)


def _every(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0


def _batch_size(batch: dict[str, Any]) -> int:
    ids = batch.get("sample_ids")
    return len(ids) if ids is not None else 0
