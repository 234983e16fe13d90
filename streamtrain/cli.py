"""``streamtrain``: train a phase from a YAML recipe, and use what it trained.

streamtrain train CONFIG [key=value ...]     train (continues the newest checkpoint by default)
streamtrain config CONFIG [key=value ...]    print the resolved, validated config and exit
streamtrain eval CONFIG [key=value ...] [--checkpoint PATH] [--json]   held-out metrics of a checkpoint
streamtrain export RUN_OR_CHECKPOINT --output DIR                     encoder / merged VLM for other code
streamtrain ask RUN_OR_EXPORT --image PATH [--image ...] QUESTION     a VLM's answer about images
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamtrain.config import RunConfig

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

EVAL_EPILOG = """\
The held-out set is the config's data.eval; another one is an override:
  streamtrain eval configs/alignment.yaml data.eval=runs/sample/digits_caption/eval \\
      --checkpoint runs/alignment/step-00000100
The checkpoint must be of the model the config describes (a run's own config is saved as
CHECKPOINT/config.yaml). Exit status: 0 done, 2 a bad config, path or checkpoint.
"""
EXPORT_HELP = """\
Write a checkpoint's model for use outside streamtrain, with its config as JSON.
  alignment: the encoders, projectors, Matryoshka dims and eval image transform, in safetensors
             + JSON; load with streamtrain.load_encoder(DIR).embed_images(...) / .embed_texts(...)
  vlm_qa:    DIR/decoder, the decoder with its adapters merged (save_pretrained, tokenizer beside
             it: AutoModelForCausalLM.from_pretrained(DIR/decoder) loads it), the vision encoder and
             the projector; load with streamtrain.load_vlm(DIR), or ask it: streamtrain ask DIR ...
Exit status: 0 done, 2 no checkpoint there, an unusable output folder.
"""
ASK_HELP = """\
Generate a trained VLM's answer (greedy) to QUESTION about each --image, on the GPU where there
is one, prompted exactly as in training and evaluation. With one image the answer is printed
alone; with several, one line per image: PATH: ANSWER.
  streamtrain ask runs/vlm_qa --image digit.png "What digit is written here?"
Exit status: 0 done, 2 no VLM checkpoint or export there, an image that does not decode.
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
        ("eval", "held-out metrics of a checkpoint (the numbers its run logged at that step)"),
    ):
        command = commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG if name != "eval" else EVAL_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. configs/alignment.yaml")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
        if name == "eval":
            command.add_argument(
                "--checkpoint",
                metavar="PATH",
                help="a step folder, best/ or a run folder (its best/, else its newest step); "
                "default: the config's output_dir",
            )
            command.add_argument("--json", action="store_true", help="print the metrics as JSON")
    export = commands.add_parser(
        "export",
        help="write a checkpoint's model for use outside streamtrain",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder, step folder or best/")
    export.add_argument("--output", "-o", required=True, metavar="DIR", help="the export folder to write")
    ask = commands.add_parser(
        "ask",
        help="ask a trained VLM a question about images",
        description=ASK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask.add_argument("source", metavar="RUN_OR_EXPORT", help="a VLM run folder, checkpoint or export")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument(
        "--image", action="append", required=True, metavar="PATH", help="an image file (repeatable)"
    )
    ask.add_argument(
        "--max-new-tokens", type=int, default=None, metavar="N", help="longest answer (default: the run's)"
    )
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

    config: RunConfig | None = None
    if args.command in ("train", "config", "eval"):
        try:
            config = load_config(args.config, args.overrides, MODEL_TYPES)
        except ConfigError as exc:
            print(f"streamtrain: {exc}", file=sys.stderr)
            return 2
    if args.command == "config":
        assert config is not None
        print(config.to_yaml(), end="")
        return 0
    from streamtrain import console

    console.quiet_third_party()

    from streamtrain.errors import TrainingError, UserError
    from streamtrain.train.stopping import Stopped

    console.adopt_library_loggers()
    try:
        return _run(args, config)
    except ConfigError as exc:
        print(f"streamtrain: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # SIGTERM / SIGINT: the checkpoint of the agreed step is written
        if os.environ.get("RANK", "0") == "0":
            print(f"streamtrain: {exc}", file=sys.stderr)
        return exc.exit_status
    except UserError as exc:  # config, paths, input data, the checkpoint to resume or use
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


def _run(args: argparse.Namespace, config: RunConfig | None) -> int:
    """The command, past the config check and the quieting of third-party notices."""
    if args.command == "export":
        from streamtrain.inference.export import export

        print(f"streamtrain: wrote {export(args.source, Path(args.output))}")
        return 0
    if args.command == "ask":
        from streamtrain.inference.vlm import ask

        answers = ask(args.source, args.image, args.question, args.max_new_tokens)
        for path, answer in zip(args.image, answers, strict=True):
            print(answer if len(answers) == 1 else f"{path}: {answer}")
        return 0
    assert config is not None
    if args.command == "eval":
        from streamtrain.inference.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(config, args.checkpoint)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
        return 0
    from streamtrain.tasks import TASKS
    from streamtrain.train.trainer import Trainer

    Trainer(config, TASKS[config.task](config)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
