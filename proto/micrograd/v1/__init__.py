"""Generated protobuf and gRPC modules of the ``micrograd.v1`` wire contract.

The ``.proto`` files beside these modules are the source of truth; the
``_pb2`` modules are generated from them by ``scripts/gen-proto`` and kept in
sync by a test.
"""
