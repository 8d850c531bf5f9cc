"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in what the user asked for (bad prompt, plan, file); never a bug."""
