"""The messages MMEngine's current logger emits inside a ``with`` block (its handlers bypass pytest's caplog)."""
import contextlib
import logging

from mmengine.logging import MMLogger


class _ListHandler(logging.Handler):

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def mmengine_messages():
    logger, handler = MMLogger.get_current_instance(), _ListHandler()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
