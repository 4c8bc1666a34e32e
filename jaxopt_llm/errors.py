"""The base class of expected bad input, and a preempted run (a leaf: no imports)."""


class UserError(ValueError):
    """Expected bad input -- a wrong argument, a missing or malformed file, a model that does not fit -- with a
    message that names the value and the fix. The command line prints it as one `error:` line and exits with
    code 2; any other exception is a bug and keeps its traceback (`--debug` or JAXOPT_LLM_DEBUG=1 shows the
    traceback of a UserError too)."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on SIGTERM with a checkpoint; run the same command again


class Preempted(Exception):
    """SIGTERM (a preempted TPU VM): the step in flight finished, a checkpoint of it was saved, the run
    stopped. Running the same command again resumes exactly."""

    def __init__(self, step: int, workdir):
        super().__init__(f"preempted: checkpoint saved at step {step} in {workdir}; run the same command again to "
                         "resume")
        self.step = step
