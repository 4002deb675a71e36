"""The one exception type for bad user input.

Every check on a file, field or argument raises `InputError` with a single line that names what was
wrong and what was expected. The command-line tools catch it, print the line and exit with status 2;
library callers get an ordinary `ValueError` subclass.
"""


class InputError(ValueError):
    """Bad input from the user: a file, a field of a file, or an argument."""
