"""The one exception type the CLI turns into a one-line message (everything else is a bug)."""


class UserError(Exception):
    """An error caused by the user's input; the CLI prints str(e) on one line and exits 2."""


class BadInputError(UserError, ValueError):
    """An input the Python API cannot read (``Classifier.predict_proba`` given an unreadable image):
    a UserError like the rest, and a ValueError as numpy and scikit-learn callers expect."""
