"""The exceptions the CLI prints as a message instead of a traceback, each with its exit code.

Exit codes: 2 for a user error (argparse's own usage code: fix the config, data or arguments),
75 for work left to do that a rerun finishes (sysexits.h's EX_TEMPFAIL: a scheduler may retry),
130 for Ctrl-C (128 + SIGINT, as shells report it).
"""

INTERRUPTED = 130


class UserError(Exception):
    """Bad input from the user (config, data, cache, arguments), phrased with the thing and the fix."""

    exit_code = 2


class RerunToFinish(UserError):
    """Work that failed for a reason worth retrying (a store that kept failing): nothing of it was
    recorded, and running the same command again finishes it."""

    exit_code = 75
