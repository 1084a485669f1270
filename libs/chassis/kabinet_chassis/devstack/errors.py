class StackError(RuntimeError):
    """A dev-stack problem the operator can fix; the message says what to do."""
