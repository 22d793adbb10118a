"""Rules every part of the package applies the same way: what names a Hub repository, how an error is quoted."""

from huggingface_hub.utils import HFValidationError, validate_repo_id


def is_hub_id(text: str) -> bool:
    """Whether `text` can name a Hub repository (`name` or `namespace/name`, huggingface_hub's own rule).

    Callers look for a local path first: this only says that a string which is not one may still be a Hub id.
    """
    try:
        validate_repo_id(str(text))
    except HFValidationError:
        return False
    return True


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["first_line", "is_hub_id"]
