class UserError(Exception):
    """Bad input from the user. The CLI prints it on one line and exits with code 2.

    The message names the file, field or tensor at fault and what would be valid.
    """
