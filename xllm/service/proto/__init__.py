"""gRPC messages and services of the cluster tier.

The modules here (``master_pb2``, ``master_pb2_grpc``, ``instance_pb2``,
``instance_pb2_grpc``) are generated from the ``.proto`` files beside this one by the build
(CMakeLists.txt runs ``python -m grpc_tools.protoc``): ``pip install .``, ``pip install -e .``
or a development ``cmake --build`` all produce them. They are never edited or committed.
"""

from __future__ import annotations

try:
    from xllm.service.proto import instance_pb2, instance_pb2_grpc, master_pb2, master_pb2_grpc
except ImportError as exc:  # the stubs were not built, or grpcio/protobuf is missing
    raise ImportError(
        "xllm.service.proto: the generated gRPC stubs could not be imported "
        f"({exc}). They are built from xllm/service/proto/*.proto: reinstall with "
        "`pip install .` / `pip install -e .`, or for a development build run `cmake --build` "
        "with a Python that has grpcio-tools."
    ) from exc

__all__ = ["instance_pb2", "instance_pb2_grpc", "master_pb2", "master_pb2_grpc"]
