"""``python -m unet3d_dist.torchrun``: torchrun (``torch.distributed.run``, same arguments) whose own ending is quiet.

The ranks say in one sentence why they stopped (a stop signal, bad input, a lost node). Plain torchrun then adds a
traceback of its own and exits 1: ``SignalException`` when it was signalled, ``ChildFailedError`` when a rank
exited non-zero, a rendezvous error when the node that hosted the rendezvous is gone. Here the first failed rank's
exit code is torchrun's (2 for bad input, 3 for bad scans that predict skipped, 75 for "run the same command
again"), so the launch scripts and Slurm see it, and nothing is printed after the ranks' sentence. A rank that
crashed (exit 1, or killed by a signal) keeps torchrun's report, which names it.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.run import main as torchrun_main

from .exit_codes import BAD_INPUT, REQUEUE, SOME_SKIPPED

SENTENCE_EXIT_CODES = (BAD_INPUT, SOME_SKIPPED, REQUEUE)  # the ranks' exit codes that come with their own sentence


class RankSaidWhy(logging.Filter):
    """Drops torchrun's "failed (exitcode: N)" log record when the rank's exit code comes with its own sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        failed = str(record.msg).startswith("failed (exitcode") and bool(record.args)
        return not (failed and record.args[0] in SENTENCE_EXIT_CODES)  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(RankSaidWhy())
    try:
        torchrun_main(argv)
    except SignalException as err:  # the ranks stopped and said so; launch scripts read their stop marker
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        if failure.exitcode not in SENTENCE_EXIT_CODES:
            raise
        return failure.exitcode
    except RendezvousConnectionError as err:  # once met (a first join that fails is another error, raised)
        print(
            f"torchrun: lost the rendezvous ({type(err).__name__}: {err}): the node that hosts it has ended or "
            "cannot be reached; run the same command on every node to resume from the latest checkpoint",
            file=sys.stderr,
        )
        return REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
