"""The base class of expected bad input (a leaf: no imports)."""


class UserError(ValueError):
    """Expected bad input -- a wrong argument, a missing or malformed file, a model that does not fit -- with a
    message that names the value and the fix. The command line prints it as one `error:` line and exits with
    code 2; any other exception is a bug and keeps its traceback (`--debug` or JAXOPT_LLM_DEBUG=1 shows the
    traceback of a UserError too)."""
