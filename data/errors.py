"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad input data, located by file and line so the user can fix the source.

    ``file`` and ``line`` may be None when the data did not come from a file (e.g. a message list
    built in Python); ``problem`` is the human-readable reason on its own.
    """

    def __init__(self, problem, file=None, line=None):
        self.problem = str(problem)
        self.file = None if file is None else str(file)
        self.line = line
        where = ""
        if self.file is not None:
            where = self.file + (f":{line}" if line is not None else "") + ": "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + self.problem)

    def located(self, file, line):
        """The same problem, attached to a file/line (used when re-raising from a reader)."""
        return DataError(self.problem, file=file, line=line)
