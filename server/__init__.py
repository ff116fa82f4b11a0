"""The gradient service: a gRPC server (``micrograd-rpc serve``) over a transport-free core.

``config`` holds the settings, ``service`` the rpcs as plain methods,
``cache`` the registered graphs, ``kernels`` the kernel choice,
``grpc_server`` the gRPC transport and ``app`` the processes and signals.
"""

from .config import Settings, SettingsError
from .service import Code, Deadline, GradientService, ServiceError

__all__ = ["Code", "Deadline", "GradientService", "ServiceError", "Settings", "SettingsError"]
