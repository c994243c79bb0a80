"""The one exception type the CLI prints as a message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, cache, arguments), phrased with the thing and the fix."""
