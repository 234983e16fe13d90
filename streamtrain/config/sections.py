"""The run configuration's sections: one dataclass per component, a docstring under each field.

Each section checks its own values in ``problems()`` (every problem, with its key); the schema
knows nothing of the data layer or the trainer, which import it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from streamtrain.config.weights import schedule, silent_steps, weight_problems
from streamtrain.errors import UserError

DEFAULT_LEASE_S = 60.0
"""How long an output_dir claim lives without a heartbeat (``train.claim_lease_s``)."""


class ConfigError(UserError):
    """A recipe or override that cannot be used; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class SourceSpec:
    """One source of a mixture: ``{path: P, weight: W, name: N}`` in ``data.train``/``data.eval``."""

    path: str | list[str] = ""
    """Anything ``data.train`` accepts as a plain entry (a directory, manifest, pattern, or a list)."""
    weight: Any = 1.0
    """A number, or a schedule ``{step: weight}``: the weight listed at step s applies from
    optimizer step s on (0: from the start; off before the first listed step). Relative."""
    name: str | None = None
    """Label in the logs (``data/<name>/samples``, ``eval/<name>/...``); default: from the path."""

    def item_problems(self) -> list[str]:
        """Checked where each entry is read, so every entry's mistakes are reported together."""
        found = [] if self.path else ["path: required"]
        found += weight_problems(self.weight, "weight")
        if self.name is not None and (not self.name or "/" in self.name):
            found.append(f"name: {self.name!r} must be non-empty and without '/'")
        return found


@dataclass(frozen=True)
class AudioConfig:
    """How audio bytes become log-mel features."""

    sample_rate: int = 16000
    """Rate every clip is resampled to before the spectrogram."""
    n_mels: int = 128
    """Mel bands."""
    n_fft: int = 400
    """FFT window in samples (25 ms at 16 kHz)."""
    hop_length: int = 160
    """Samples between frames (10 ms at 16 kHz)."""
    max_seconds: float = 10.0
    """Clip length; longer audio is cropped, shorter is zero-padded (and masked)."""

    @property
    def max_samples(self) -> int:
        return round(self.max_seconds * self.sample_rate)

    @property
    def max_frames(self) -> int:
        """Frames of a ``max_seconds`` clip (Whisper's convention: the last centred frame is dropped)."""
        return self.max_samples // self.hop_length


DEFAULT_CAPTION_PROMPTS = (
    "Describe this image.",
    "What is shown in this image?",
    "Write a short caption for this image.",
    "Describe what you see.",
)
"""Questions a caption answers when caption samples train a VLM (``data.caption_prompts``)."""


@dataclass
class DataConfig:
    """Where the shards are and how they become batches."""

    train: str | list[str | SourceSpec] = ""
    """Training shards: a shardify output (directory or s3:// prefix), a brace pattern, or a list
    (concatenated). A list of ``{path, weight, name}`` mappings is a mixture: every step holds
    each source's share by weight, and each source cycles through its own epochs."""
    eval: str | list[str | SourceSpec] | None = None
    """Held-out shards, same forms as ``train``; no evaluation when unset. Named mappings
    (``{path, name}``) are evaluated one by one too, their metrics as ``eval/<name>/...``."""
    sample_log: str | None = None
    """Append one JSON line per optimizer step and rank with that step's sample_ids to this file."""
    num_workers: int = 2
    """Dataloader worker processes per rank (0 reads in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    shuffle_buffer: int = 256
    """Undecoded samples held for shuffling, over all ranks: each of a source's lanes (one per
    sample of the global batch) shuffles windows of ``shuffle_buffer // global batch`` samples,
    so a rank holds about ``shuffle_buffer / world size`` per source. 1 keeps lane order."""
    max_member_mb: float = 256.0
    """A tar member (one image, clip or text) larger than this is skipped unread and its sample
    counted in data/oversized_samples: a hostile or broken shard cannot exhaust memory."""
    retries: int = 6
    """Tries of one storage read (a transient S3 or network error) before the rest of its shard is
    skipped for the epoch; a read that succeeds resets the count. Each retry is counted in
    data/read_retries, each reopened object in data/read_reopens."""
    retry_backoff_s: float = 0.5
    """Wait after the first failed try of a read; it doubles with every further failure (jittered)."""
    retry_max_backoff_s: float = 8.0
    """Ceiling of the wait between two tries of one read."""
    read_ahead_mb: float = 32.0
    """Remote shards (S3): megabytes each loader worker keeps requested ahead of its readers, over
    all its open shards, in concurrent range requests (the budget it may hold beyond what it
    reads). What a worker must have in flight to read at rate R from a store answering after L
    seconds is R x L: 32 MB covers 200 MB/s per worker at 100 ms, with room for the burst of its
    lanes' next shuffle windows. 0: one request at a time."""
    cache_dir: str | None = None
    """Keep whole remote shards on local disk here (shared by the node's workers and ranks): a
    later epoch reads them locally, verified against their checksums. Off when unset."""
    cache_limit: str | int = "50GB"
    """Most the cache holds (``500MB``, ``20GB``, ``1TiB`` or bytes); least recently used shards
    are removed first. A shard larger than it is read from the store, uncached."""
    image_size: int = 224
    """Square size images are cropped to."""
    horizontal_flip: bool = True
    """Training only: random horizontal flips (turn off for text, digits and other chiral content)."""
    decode_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where images are decoded and augmented. ``cpu``: in the loader workers. ``cuda``: the
    workers only read bytes and draw each image's augmentation; the training process decodes each
    batch of JPEGs on the GPU in one call (other formats, CMYK and progressive JPEGs are decoded
    by the workers and joined in). ``auto``: ``cuda`` when training on a GPU and the images are
    mostly JPEG, else ``cpu``."""
    text_dropout_prob: float = 0.0
    """Training only: probability that a caption is replaced by the empty string."""
    audio: AudioConfig | None = None
    """Decode audio members to log-mel with these settings; audio is ignored when unset."""
    max_question_tokens: int = 128
    """QA: longest question kept (tokens)."""
    max_answer_tokens: int = 128
    """QA: longest answer kept (tokens, end-of-sequence included)."""
    max_seq_len: int = 2048
    """VLM: longest sequence, vision tokens included. A conversation longer than this loses whole
    turns from its end (counted in data/truncated_turns); with ``pack``, the length of a packed row."""
    pack: bool = False
    """VLM: put several samples in one row, up to ``max_seq_len`` tokens, each attending only to
    itself (its positions restart); the samples of a micro-batch and their loss are unchanged."""
    caption_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_CAPTION_PROMPTS))
    """VLM: caption samples train as a one-turn conversation whose question is one of these,
    drawn per sample (the first one at evaluation)."""

    def problems(self) -> list[str]:
        found = []
        if not self.train:
            found.append("train: required (a shardify output directory, s3:// prefix or brace pattern)")
        found += _source_list_problems(self.train, "train", weighted=True)
        found += _source_list_problems(self.eval, "eval", weighted=False)
        if not 0.0 <= self.text_dropout_prob <= 1.0:
            found.append(f"text_dropout_prob: {self.text_dropout_prob} is not in [0, 1]")
        found += _at_least(self, ("num_workers", 0), ("prefetch_factor", 1), ("shuffle_buffer", 1))
        if self.max_member_mb <= 0:
            found.append(f"max_member_mb: {self.max_member_mb} must be > 0")
        found += _at_least(self, ("retries", 1))
        if self.retry_backoff_s < 0:
            found.append(f"retry_backoff_s: {self.retry_backoff_s} must be >= 0")
        if self.retry_max_backoff_s < max(0.0, self.retry_backoff_s):
            found.append(
                f"retry_max_backoff_s: {self.retry_max_backoff_s} must be >= retry_backoff_s "
                f"({self.retry_backoff_s})"
            )
        found += _at_least(self, ("image_size", 8), ("max_question_tokens", 1), ("max_answer_tokens", 2))
        if not self.read_ahead_mb >= 0:
            found.append(f"read_ahead_mb: {self.read_ahead_mb} must be >= 0")
        try:
            if cache_limit_bytes(self.cache_limit) <= 0:
                found.append(f"cache_limit: {self.cache_limit!r} must be more than 0 bytes")
        except ValueError:
            found.append(f"cache_limit: {self.cache_limit!r} is not a size (such as 500MB, 20GB or 1TiB)")
        found += _at_least(self, ("max_seq_len", 8))
        if not self.caption_prompts or not all(
            isinstance(p, str) and p.strip() for p in self.caption_prompts
        ):
            found.append("caption_prompts: give at least one prompt, each a non-empty string")
        return found


_SIZE_UNITS = (
    *(("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("TIB", 2**40)),
    *(("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12), ("B", 1)),
)


def cache_limit_bytes(text: str | int | float) -> int:
    """Bytes in a ``cache_limit``: a number, or one with a unit (KB/MB/GB/TB by 1000, KiB/MiB/GiB/TiB
    by 1024). ValueError if it is not one."""
    value = text
    factor = 1
    if isinstance(text, str):
        spoken = text.strip().upper().replace(" ", "")
        for unit, size in _SIZE_UNITS:
            if spoken.endswith(unit):
                spoken, factor = spoken[: -len(unit)], size
                break
        value = spoken
    if isinstance(value, bool):
        raise ValueError(f"not a size: {text!r}")
    number = float(value)
    if not number >= 0:
        raise ValueError(f"not a size: {text!r}")
    return int(number * factor)


def _source_list_problems(value: Any, key: str, weighted: bool) -> list[str]:
    """Mixture mistakes of ``data.train`` / ``data.eval``, all of them, each with its key path."""
    if not isinstance(value, list) or not any(isinstance(item, SourceSpec) for item in value):
        return []
    found = []
    plain = [i for i, item in enumerate(value) if not isinstance(item, SourceSpec)]
    if plain:
        found.append(
            f"{key}: entries {plain} are plain paths among {{path, weight, name}} mappings; "
            "write every entry of a mixture as a mapping"
        )
    specs = [(i, item) for i, item in enumerate(value) if isinstance(item, SourceSpec)]
    names = Counter(source_name(item) for _, item in specs)
    for i, item in specs:
        if not weighted and item.weight != 1.0:
            found.append(f"{key}[{i}].weight: held-out sources are not weighted (remove it)")
    repeated = sorted(name for name, n in names.items() if n > 1)
    if repeated:
        found.append(f"{key}: source names {repeated} are used more than once; give each entry a name")
    if weighted and not found and not any(item.item_problems() for _, item in specs):
        silent = silent_steps([schedule(item.weight) for _, item in specs])
        if silent:
            found.append(f"{key}: every weight is 0 from step {silent[0]}; at least one source must be on")
    return found


def source_name(spec: SourceSpec) -> str:
    """A mixture entry's label: its ``name``, else the last part of its (first) path."""
    if spec.name:
        return spec.name
    path = spec.path if isinstance(spec.path, str) else (spec.path[0] if spec.path else "")
    parts = [p for p in path.replace("\\", "/").split("/") if p and p != "manifest.json"]
    return parts[-1] if parts else "source"


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 1000
    """Optimizer steps to train for (the run is step-based; epochs roll over inside the stream)."""
    batch_size: int = 32
    """Samples per device per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine, as a fraction of ``lr``."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to biases, norms and the temperature."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that supports it, else full precision."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir if any; none; or a checkpoint path."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); plain DDP when unset."""
    seed: int = 0
    """Seeds model initialisation, data order and augmentations."""
    checkpoint_on_signal: bool = True
    """SIGTERM or SIGINT (preemption, Ctrl-C): every rank finishes its optimizer step, they agree
    on that step, write its checkpoint and exit 143 / 130; a second signal exits at once. false:
    the signal ends the run where it is (the newest checkpoint stays the resume point)."""
    claim_lease_s: float = DEFAULT_LEASE_S
    """output_dir is claimed by one job at a time (output_dir/.claim.json, renewed every quarter
    of this): a second job is refused while the claim lives; a claim whose holder died is taken
    over at once on the same host, or once its heartbeat is this many seconds old."""
    collective_timeout_s: float = 1800.0
    """Several processes: how long a rank waits in a collective (gradient exchange, barrier)
    for the others. A rank that died or hangs then ends the job with an error on every rank
    instead of a hang; raise it if checkpoint writes or evaluation of a huge model take longer."""

    def problems(self) -> list[str]:
        found = _at_least(self, ("max_steps", 1), ("batch_size", 1), ("grad_accum_steps", 1))
        for name in ("collective_timeout_s", "claim_lease_s"):
            if getattr(self, name) <= 0:
                found.append(f"{name}: {getattr(self, name)} must be > 0")
        found += _at_least(self, ("warmup_steps", 0))
        if self.lr <= 0:
            found.append(f"lr: {self.lr} must be > 0")
        if self.weight_decay < 0:
            found.append(f"weight_decay: {self.weight_decay} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            found.append(f"min_lr_ratio: {self.min_lr_ratio} is not in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            found.append(f"betas: {self.betas} must be two numbers in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            found.append(f"max_grad_norm: {self.max_grad_norm} must be > 0 or null")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            found.append(f"deepspeed: {self.deepspeed!r} is not a file")
        return found


@dataclass
class CheckpointConfig:
    """Step checkpoints under output_dir/step-XXXXXXXX/."""

    every_steps: int = 500
    """Save every this many optimizer steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    keep_every_steps: int = 0
    """Also keep checkpoints whose step is a multiple of this (0: none)."""
    best_metric: str | None = None
    """Evaluation metric that picks output_dir/best/ (the task's default when unset)."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller best_metric is better."""

    def problems(self) -> list[str]:
        return _at_least(self, ("every_steps", 0), ("keep_last", 1), ("keep_every_steps", 0))


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    every_steps: int = 500
    """Evaluate every this many optimizer steps (and at the end); 0 evaluates only at the end."""
    batch_size: int = 64
    """Samples per device per evaluation batch."""
    max_samples: int | None = None
    """Evaluate on at most this many held-out samples (the first ones of the eval set)."""

    def problems(self) -> list[str]:
        found = _at_least(self, ("every_steps", 0), ("batch_size", 1))
        if self.max_samples is not None and self.max_samples < 1:
            found.append(f"max_samples: {self.max_samples} must be >= 1 or null")
        return found


@dataclass
class LogConfig:
    """Where metrics go."""

    trackers: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    """jsonl (output_dir/metrics.jsonl), tensorboard, wandb (offline unless logged in)."""
    every_steps: int = 10
    """Log training metrics every this many optimizer steps."""
    project: str = "streamtrain"
    """Project name for tensorboard/wandb."""
    progress_bar: bool = True
    """Show a tqdm bar on the main process."""

    def problems(self) -> list[str]:
        return _at_least(self, ("every_steps", 1))


@dataclass
class RunConfig:
    """A whole run: one training phase and everything it needs."""

    task: str
    """Training phase: alignment or vlm_qa."""
    output_dir: str
    """Checkpoints, metrics, the resolved config and the sample log default live here."""
    model: Any
    """The phase's model settings (its own typed section)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _at_least(section: Any, *limits: tuple[str, int]) -> list[str]:
    return [
        f"{name}: {getattr(section, name)} must be >= {low}"
        for name, low in limits
        if getattr(section, name) < low
    ]
