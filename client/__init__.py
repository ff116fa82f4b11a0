"""The gradient service from Python: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

>>> from micrograd.client import Client
>>> with Client("127.0.0.1:50051") as client:  # doctest: +SKIP
...     client.backward(g)                    # the remote twin of g.backward()
"""

from .aio import AsyncClient
from .channel import Retry
from .client import Client
from .errors import (
    DeadlineExceeded,
    InvalidGraph,
    NotFound,
    RemoteError,
    ResourceExhausted,
    Unavailable,
    Violation,
)
from .result import Result

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "InvalidGraph",
    "NotFound",
    "RemoteError",
    "ResourceExhausted",
    "Result",
    "Retry",
    "Unavailable",
    "Violation",
]
