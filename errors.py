# The ground floor: the one exception every file may raise for bad input.


class UserError(ValueError):
    """Bad input (a flag, a file, a config): raised where the fault is found, printed by each script's
    main as one line, with a non-zero exit; never a traceback."""
