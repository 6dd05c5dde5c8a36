# Shared by the sbatch scripts (sourced, not run): the log header of each attempt, the job's step, the requeue.
# shellcheck shell=bash

# REQUEUE_EXIT_CODE, which launch/*.sh exit with when the trainer stopped on a signal after a checkpoint;
# TORCHRUN and default_nproc. (Jobs run in the directory they were submitted from: the repository root.)
# shellcheck source=launch/lib.sh
source launch/lib.sh

# Requeued attempts append to the same log (--open-mode=append), so each one starts with a header.
echo "=== job $SLURM_JOB_ID ($SLURM_JOB_NAME), attempt $((${SLURM_RESTART_COUNT:-0} + 1)), nodes $SLURM_JOB_NODELIST, $(date -Is)"

# Run "$@" as the job's step, one task per node, and exit with its code. When that is 75 after a SIGUSR1 (the time
# limit's notice) the trainer has checkpointed, so the job is requeued: the next attempt runs the same command,
# which resumes from the run's latest checkpoint.
run_step() {
  # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05), so it is passed on explicitly.
  # One launcher per node of this allocation, also when a requeued job got fewer nodes than it first asked for.
  srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" "$@" &
  local step=$! status cancelled=0
  # --signal=B:USR1@N and `scancel --batch --signal=USR1` reach only this shell: srun passes the signal on to
  # every process of the step. (--signal=USR1@N and `scancel --signal=USR1` reach those processes directly.)
  # Bash runs a trap only between commands, so the step runs in the background and a trapped signal
  # interrupts `wait`, which then waits again.
  # shellcheck disable=SC2064  # $step is expanded now, on purpose
  trap "echo 'SIGUSR1: the step checkpoints and stops'; kill -USR1 $step" USR1
  # scancel, a preemption and a time limit without notice send SIGTERM to every process of the job, this shell
  # included, and SIGKILL after KillWait. The step checkpoints on its own; this shell waits for it, since the job
  # would end with it, and leaves the requeue to Slurm (preemption) or to the user (scancel: requeue or resubmit).
  trap "echo 'SIGTERM: the step checkpoints and stops; no requeue from this job'; cancelled=1" TERM
  while :; do
    status=0
    wait "$step" || status=$?
    kill -0 "$step" 2>/dev/null || break
  done
  if [ "$status" -eq "$REQUEUE_EXIT_CODE" ] && [ "$cancelled" = 0 ]; then
    echo "requeueing job $SLURM_JOB_ID: the next attempt resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$status"
}
