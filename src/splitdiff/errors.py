"""User-facing errors: the CLI prints these as one line and exits non-zero."""


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so that a message is always a single, bounded line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserError(Exception):
    """A mistake in what the user asked for (bad prompt, plan, file); never a bug."""
