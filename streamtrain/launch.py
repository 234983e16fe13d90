"""``python -m streamtrain.launch [torchrun options] -m streamtrain.cli train ...``: torchrun, with
the exit status of a stopped job.

torchrun forwards SIGTERM / SIGINT to every rank and gives them 30 s before SIGKILL; the ranks
finish their step, write its checkpoint and exit 143 / 130. torchrun itself would then end with
a traceback and status 1, and a job whose ranks stopped on their own (a signal that reached only
them) would be reported as failed. This wrapper exits 143 / 130 in both cases, quietly, and
leaves every other outcome as torchrun reports it.
"""

from __future__ import annotations

import sys

_STOPPED = {128 + 15, 128 + 2}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except SignalException as exc:  # the launcher was signalled; torchrun waited for the ranks
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        # Ranks that stopped exit 143 / 130 once every rank has passed the checkpoint's last
        # barrier; torchrun then SIGTERMs the others, which may be past their handler (-15).
        stopped = codes & _STOPPED
        if stopped and codes <= _STOPPED | {-15, -2}:
            return max(stopped)
        print(exc.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
