"""The command's name and the errors the pretraining job reports as one line.

Its own module so that the CLI (cli.py) and the loop (train.py) both import it
and neither imports the other.
"""
PROG = "flipkern-pretrain"


class CLIError(Exception):
    """A bad argument or unusable data path: one error line, exit code 2."""


class NonFiniteLoss(RuntimeError):
    """The loss became nan/inf and --skip-nonfinite is off: exit code 1."""
