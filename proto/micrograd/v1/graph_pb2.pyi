from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OP_UNSPECIFIED: _ClassVar[Op]
    OP_INPUT: _ClassVar[Op]
    OP_CONST: _ClassVar[Op]
    OP_ADD: _ClassVar[Op]
    OP_SUB: _ClassVar[Op]
    OP_MUL: _ClassVar[Op]
    OP_DIV: _ClassVar[Op]
    OP_NEG: _ClassVar[Op]
    OP_POW: _ClassVar[Op]
    OP_POW_VALUE: _ClassVar[Op]
    OP_RELU: _ClassVar[Op]
    OP_TANH: _ClassVar[Op]
    OP_EXP: _ClassVar[Op]
    OP_LOG: _ClassVar[Op]
    OP_SIGMOID: _ClassVar[Op]
    OP_SIN: _ClassVar[Op]
    OP_COS: _ClassVar[Op]
    OP_TAN: _ClassVar[Op]
    OP_ASIN: _ClassVar[Op]
    OP_ACOS: _ClassVar[Op]
    OP_ATAN: _ClassVar[Op]
    OP_SINH: _ClassVar[Op]
    OP_COSH: _ClassVar[Op]
    OP_ASINH: _ClassVar[Op]
    OP_ACOSH: _ClassVar[Op]
    OP_ATANH: _ClassVar[Op]
    OP_SQRT: _ClassVar[Op]
    OP_ABS: _ClassVar[Op]
    OP_LOG1P: _ClassVar[Op]
    OP_EXPM1: _ClassVar[Op]
    OP_LOG2: _ClassVar[Op]
    OP_LOG10: _ClassVar[Op]
    OP_ERF: _ClassVar[Op]
    OP_SOFTPLUS: _ClassVar[Op]
    OP_FLOOR: _ClassVar[Op]
    OP_CEIL: _ClassVar[Op]
    OP_SIGN: _ClassVar[Op]
    OP_ATAN2: _ClassVar[Op]
    OP_MAXIMUM: _ClassVar[Op]
    OP_MINIMUM: _ClassVar[Op]
    OP_WHERE: _ClassVar[Op]
OP_UNSPECIFIED: Op
OP_INPUT: Op
OP_CONST: Op
OP_ADD: Op
OP_SUB: Op
OP_MUL: Op
OP_DIV: Op
OP_NEG: Op
OP_POW: Op
OP_POW_VALUE: Op
OP_RELU: Op
OP_TANH: Op
OP_EXP: Op
OP_LOG: Op
OP_SIGMOID: Op
OP_SIN: Op
OP_COS: Op
OP_TAN: Op
OP_ASIN: Op
OP_ACOS: Op
OP_ATAN: Op
OP_SINH: Op
OP_COSH: Op
OP_ASINH: Op
OP_ACOSH: Op
OP_ATANH: Op
OP_SQRT: Op
OP_ABS: Op
OP_LOG1P: Op
OP_EXPM1: Op
OP_LOG2: Op
OP_LOG10: Op
OP_ERF: Op
OP_SOFTPLUS: Op
OP_FLOOR: Op
OP_CEIL: Op
OP_SIGN: Op
OP_ATAN2: Op
OP_MAXIMUM: Op
OP_MINIMUM: Op
OP_WHERE: Op

class Node(_message.Message):
    __slots__ = ("op", "args", "value", "name")
    OP_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    op: Op
    args: _containers.RepeatedScalarFieldContainer[int]
    value: float
    name: str
    def __init__(self, op: _Optional[_Union[Op, str]] = ..., args: _Optional[_Iterable[int]] = ..., value: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class NodeName(_message.Message):
    __slots__ = ("node", "name")
    NODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    node: int
    name: str
    def __init__(self, node: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class PackedGraph(_message.Message):
    __slots__ = ("ops", "args", "values", "names")
    OPS_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ops: bytes
    args: bytes
    values: bytes
    names: _containers.RepeatedCompositeFieldContainer[NodeName]
    def __init__(self, ops: _Optional[bytes] = ..., args: _Optional[bytes] = ..., values: _Optional[bytes] = ..., names: _Optional[_Iterable[_Union[NodeName, _Mapping]]] = ...) -> None: ...
