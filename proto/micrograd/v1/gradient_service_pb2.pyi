from micrograd.v1 import graph_pb2 as _graph_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Selection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_UNSPECIFIED: _ClassVar[Selection]
    SELECTION_ALL: _ClassVar[Selection]
    SELECTION_INPUTS: _ClassVar[Selection]
    SELECTION_NAMED: _ClassVar[Selection]
    SELECTION_LISTED: _ClassVar[Selection]
    SELECTION_OUTPUT: _ClassVar[Selection]

class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_UNSPECIFIED: _ClassVar[Part]
    PART_HEADER: _ClassVar[Part]
    PART_VALUES: _ClassVar[Part]
    PART_GRADIENTS: _ClassVar[Part]
SELECTION_UNSPECIFIED: Selection
SELECTION_ALL: Selection
SELECTION_INPUTS: Selection
SELECTION_NAMED: Selection
SELECTION_LISTED: Selection
SELECTION_OUTPUT: Selection
PART_UNSPECIFIED: Part
PART_HEADER: Part
PART_VALUES: Part
PART_GRADIENTS: Part

class Batch(_message.Message):
    __slots__ = ("columns", "values", "values_f64")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUES_F64_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    values_f64: bytes
    def __init__(self, columns: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., values_f64: _Optional[bytes] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("graph", "packed_graph", "graph_id", "inputs", "output", "selection", "nodes", "batch", "binary_output", "skip_gradients")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PACKED_GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BINARY_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SKIP_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    packed_graph: _graph_pb2.PackedGraph
    graph_id: str
    inputs: _containers.ScalarMap[str, float]
    output: int
    selection: Selection
    nodes: _containers.RepeatedScalarFieldContainer[int]
    batch: Batch
    binary_output: bool
    skip_gradients: bool
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., packed_graph: _Optional[_Union[_graph_pb2.PackedGraph, _Mapping]] = ..., graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, float]] = ..., output: _Optional[int] = ..., selection: _Optional[_Union[Selection, str]] = ..., nodes: _Optional[_Iterable[int]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., binary_output: _Optional[bool] = ..., skip_gradients: _Optional[bool] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("nodes", "values", "grads", "values_f64", "grads_f64", "output", "rows", "node_count", "graph_id", "names")
    class NamesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    VALUES_F64_FIELD_NUMBER: _ClassVar[int]
    GRADS_F64_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    grads: _containers.RepeatedScalarFieldContainer[float]
    values_f64: bytes
    grads_f64: bytes
    output: int
    rows: int
    node_count: int
    graph_id: str
    names: _containers.ScalarMap[str, int]
    def __init__(self, nodes: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., grads: _Optional[_Iterable[float]] = ..., values_f64: _Optional[bytes] = ..., grads_f64: _Optional[bytes] = ..., output: _Optional[int] = ..., rows: _Optional[int] = ..., node_count: _Optional[int] = ..., graph_id: _Optional[str] = ..., names: _Optional[_Mapping[str, int]] = ...) -> None: ...

class EvaluateStreamRequest(_message.Message):
    __slots__ = ("request", "chunk_size")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    request: EvaluateRequest
    chunk_size: int
    def __init__(self, request: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class EvaluateStreamResponse(_message.Message):
    __slots__ = ("part", "header", "offset", "data", "data_f64")
    PART_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_F64_FIELD_NUMBER: _ClassVar[int]
    part: Part
    header: EvaluateResponse
    offset: int
    data: _containers.RepeatedScalarFieldContainer[float]
    data_f64: bytes
    def __init__(self, part: _Optional[_Union[Part, str]] = ..., header: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[_Iterable[float]] = ..., data_f64: _Optional[bytes] = ...) -> None: ...

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph", "packed_graph")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PACKED_GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    packed_graph: _graph_pb2.PackedGraph
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., packed_graph: _Optional[_Union[_graph_pb2.PackedGraph, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id", "node_count")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    node_count: int
    def __init__(self, graph_id: _Optional[str] = ..., node_count: _Optional[int] = ...) -> None: ...

class UploadGraphRequest(_message.Message):
    __slots__ = ("piece",)
    PIECE_FIELD_NUMBER: _ClassVar[int]
    piece: _graph_pb2.PackedGraph
    def __init__(self, piece: _Optional[_Union[_graph_pb2.PackedGraph, _Mapping]] = ...) -> None: ...

class UploadGraphResponse(_message.Message):
    __slots__ = ("graph_id", "node_count")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    node_count: int
    def __init__(self, graph_id: _Optional[str] = ..., node_count: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpInfo(_message.Message):
    __slots__ = ("op", "name", "arity", "uses_value", "doc")
    OP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARITY_FIELD_NUMBER: _ClassVar[int]
    USES_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    op: _graph_pb2.Op
    name: str
    arity: int
    uses_value: bool
    doc: str
    def __init__(self, op: _Optional[_Union[_graph_pb2.Op, str]] = ..., name: _Optional[str] = ..., arity: _Optional[int] = ..., uses_value: _Optional[bool] = ..., doc: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_nodes", "max_message_bytes", "max_batch_rows", "max_batch_cells", "max_concurrent_calls", "graph_cache_entries", "graph_cache_bytes", "max_chunk_size")
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_CELLS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_nodes: int
    max_message_bytes: int
    max_batch_rows: int
    max_batch_cells: int
    max_concurrent_calls: int
    graph_cache_entries: int
    graph_cache_bytes: int
    max_chunk_size: int
    def __init__(self, max_nodes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_batch_cells: _Optional[int] = ..., max_concurrent_calls: _Optional[int] = ..., graph_cache_entries: _Optional[int] = ..., graph_cache_bytes: _Optional[int] = ..., max_chunk_size: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "ops", "limits", "kernel", "workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    ops: _containers.RepeatedCompositeFieldContainer[OpInfo]
    limits: Limits
    kernel: str
    workers: int
    def __init__(self, version: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[OpInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., kernel: _Optional[str] = ..., workers: _Optional[int] = ...) -> None: ...

class JacobianRequest(_message.Message):
    __slots__ = ("request", "outputs", "cotangents")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    request: EvaluateRequest
    outputs: _containers.RepeatedScalarFieldContainer[int]
    cotangents: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., outputs: _Optional[_Iterable[int]] = ..., cotangents: _Optional[_Iterable[float]] = ...) -> None: ...

class JacobianResponse(_message.Message):
    __slots__ = ("outputs", "nodes", "values", "jacobian", "values_f64", "jacobian_f64", "rows", "node_count", "graph_id", "weighted")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    JACOBIAN_FIELD_NUMBER: _ClassVar[int]
    VALUES_F64_FIELD_NUMBER: _ClassVar[int]
    JACOBIAN_F64_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedScalarFieldContainer[int]
    nodes: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    jacobian: _containers.RepeatedScalarFieldContainer[float]
    values_f64: bytes
    jacobian_f64: bytes
    rows: int
    node_count: int
    graph_id: str
    weighted: bool
    def __init__(self, outputs: _Optional[_Iterable[int]] = ..., nodes: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., jacobian: _Optional[_Iterable[float]] = ..., values_f64: _Optional[bytes] = ..., jacobian_f64: _Optional[bytes] = ..., rows: _Optional[int] = ..., node_count: _Optional[int] = ..., graph_id: _Optional[str] = ..., weighted: _Optional[bool] = ...) -> None: ...

class HessianVectorProductRequest(_message.Message):
    __slots__ = ("request", "vector")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    request: EvaluateRequest
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class HessianVectorProductResponse(_message.Message):
    __slots__ = ("nodes", "values", "grads", "hvp", "values_f64", "grads_f64", "hvp_f64", "output", "rows", "node_count", "graph_id")
    NODES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    HVP_FIELD_NUMBER: _ClassVar[int]
    VALUES_F64_FIELD_NUMBER: _ClassVar[int]
    GRADS_F64_FIELD_NUMBER: _ClassVar[int]
    HVP_F64_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    grads: _containers.RepeatedScalarFieldContainer[float]
    hvp: _containers.RepeatedScalarFieldContainer[float]
    values_f64: bytes
    grads_f64: bytes
    hvp_f64: bytes
    output: int
    rows: int
    node_count: int
    graph_id: str
    def __init__(self, nodes: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., grads: _Optional[_Iterable[float]] = ..., hvp: _Optional[_Iterable[float]] = ..., values_f64: _Optional[bytes] = ..., grads_f64: _Optional[bytes] = ..., hvp_f64: _Optional[bytes] = ..., output: _Optional[int] = ..., rows: _Optional[int] = ..., node_count: _Optional[int] = ..., graph_id: _Optional[str] = ...) -> None: ...
