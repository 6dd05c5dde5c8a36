"""The exit codes every command, launcher and Slurm script agrees on (docs: README, "Launching")."""

BAD_INPUT = 2  # one sentence said what to fix; running again as it is would fail again
SOME_SKIPPED = 3  # prepare, predict: each bad case or scan was named in one sentence; the others were done
REQUEUE = 75  # EX_TEMPFAIL: stopped after a checkpoint or by a lost node; the same command resumes
