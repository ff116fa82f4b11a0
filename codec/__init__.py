"""The codec: engine tapes and arrays to and from ``micrograd.v1`` messages.

It knows the engine and the generated messages, nothing of gRPC; the server
and the client both speak to the wire through it.
"""

from .arrays import f64_array, f64_bytes, response_arrays
from .graph import (
    GraphTooLarge,
    encode_value,
    from_graph,
    from_graph_bytes,
    graph_id,
    pack,
    pack_value,
    to_graph,
    unpack,
)
from .request import batch_rows, bindings, output_index, selection_indices
from .wire import Wire, varint, with_arrays, with_fields, with_message

__all__ = [
    "GraphTooLarge",
    "Wire",
    "batch_rows",
    "bindings",
    "encode_value",
    "f64_array",
    "f64_bytes",
    "from_graph",
    "from_graph_bytes",
    "graph_id",
    "output_index",
    "pack",
    "pack_value",
    "response_arrays",
    "selection_indices",
    "to_graph",
    "unpack",
    "varint",
    "with_arrays",
    "with_fields",
    "with_message",
]
