"""The exit codes every command, launcher and Slurm script agrees on (docs: README, "Launching")."""

BAD_INPUT = 2  # one sentence said what to fix; running again as it is would fail again
REQUEUE = 75  # EX_TEMPFAIL: stopped after a checkpoint or by a lost node; the same command resumes
