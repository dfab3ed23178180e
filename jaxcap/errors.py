"""The base of every error that is a user's to fix (a bad file, a wrong folder, a setting out
of range): ``jaxcap`` prints its message as one ``jaxcap COMMAND: error:`` line, never a
traceback. Each module raises a subclass of its own, whose message says what was wrong,
where (file, line, key) and what to do."""


class UserError(Exception):
    """A mistake in what was asked or given; the message says what to do."""
