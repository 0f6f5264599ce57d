"""Free local ports: the service's own helper (one implementation for code and tests)."""

from serving.ops.stack import free_port

__all__ = ["free_port"]
