"""The one exception type for bad user input."""

from __future__ import annotations


class QSPValidationError(ValueError):
    """Bad user input, found before any compute starts.

    The message names the file, the field path inside it, the offending value and what is
    allowed, e.g. ``regimens/x.yaml: ici[0].unit = 'mg/m2': allowed values are 'mg', 'mg/kg'``.
    The CLI prints it without a traceback and exits with status 2.
    """

    def __init__(self, source: str, field: str, value: object, allowed: str):
        self.source = str(source)
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{self.source}: {field} = {value!r}: {allowed}")
