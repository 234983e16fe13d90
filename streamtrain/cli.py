"""``streamtrain``: train a phase from a YAML recipe.

streamtrain train CONFIG [key=value ...]     train (continues the newest checkpoint by default)
streamtrain config CONFIG [key=value ...]    print the resolved, validated config and exit
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """\
Overrides use dotted keys and YAML values, e.g.
  streamtrain train configs/alignment.yaml train.max_steps=200 train.lr=3e-4 data.train=[s3://b/a,s3://b/b]
Keys users rely on: output_dir, data.train, data.eval, data.sample_log, train.max_steps,
train.batch_size (per device), train.grad_accum_steps, train.lr, train.warmup_steps,
train.weight_decay, train.max_grad_norm, train.mixed_precision, train.resume (auto|none|PATH),
train.deepspeed, checkpoint.every_steps, checkpoint.keep_last, checkpoint.keep_every_steps,
eval.every_steps, log.trackers. Several processes: start this under accelerate launch or
torchrun (./launch.sh does it from NNODES/NPROC_PER_NODE/... or Slurm's variables).
Exit status: 0 done, 2 bad config or input (or output_dir in use by another run), 1 failure
during training, 143 / 130 stopped by SIGTERM / SIGINT after writing a checkpoint.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamtrain",
        description="Streaming-data trainer for vision/audio-language models on WebDataset shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("train", "train the phase a recipe describes"),
        ("config", "print the resolved config and exit"),
    ):
        command = commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. configs/alignment.yaml")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    return parser


def _claimed_elsewhere(recipe: str, overrides: list[str]) -> str | None:
    """The live job holding the recipe's output_dir, found before the slow imports (torch,
    transformers: 10-20 s) so that a second job is refused in a second or two. A peek only:
    the config is validated, and the claim taken, later; anything unclear here is left to them."""
    import yaml

    from streamtrain.config import DEFAULT_LEASE_S
    from streamtrain.train.claim import OutputClaim

    try:
        raw = yaml.safe_load(Path(recipe).read_text())
        values = {"output_dir": raw.get("output_dir"), "lease": (raw.get("train") or {}).get("claim_lease_s")}
        for item in overrides:
            key, _, text = item.partition("=")
            if key in ("output_dir", "train.claim_lease_s"):
                values["output_dir" if key == "output_dir" else "lease"] = yaml.safe_load(text)
        output, lease = Path(str(values["output_dir"])), float(values["lease"] or DEFAULT_LEASE_S)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None
    if not values["output_dir"] or os.environ.get("RANK", "0") != "0" or not output.is_dir():
        return None
    return OutputClaim(output, lease).live_holder()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train" and (holder := _claimed_elsewhere(args.config, args.overrides)):
        print(f"streamtrain: error: {holder}", file=sys.stderr)
        return 2
    # The recipe is checked before torch and transformers are imported (10-20 s): a mistake in it
    # is refused in well under a second.
    from streamtrain.config import ConfigError, load_config
    from streamtrain.config.models import MODEL_TYPES

    try:
        config = load_config(args.config, args.overrides, MODEL_TYPES)
    except ConfigError as exc:
        print(f"streamtrain: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.to_yaml(), end="")
        return 0
    from streamtrain import console

    console.quiet_third_party()

    from streamtrain.errors import TrainingError, UserError
    from streamtrain.tasks import TASKS
    from streamtrain.train.stopping import Stopped
    from streamtrain.train.trainer import Trainer

    console.adopt_library_loggers()
    try:
        Trainer(config, TASKS[config.task](config)).fit()
    except ConfigError as exc:
        print(f"streamtrain: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # SIGTERM / SIGINT: the checkpoint of the agreed step is written
        if os.environ.get("RANK", "0") == "0":
            print(f"streamtrain: {exc}", file=sys.stderr)
        return exc.exit_status
    except UserError as exc:  # config, paths, input data, the checkpoint to resume
        print(f"streamtrain: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:  # e.g. the disk filled up during a checkpoint write
        print(f"streamtrain: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path that cannot be written or read, a full disk outside checkpoints
        print(f"streamtrain: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("streamtrain: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
