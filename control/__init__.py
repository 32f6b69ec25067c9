"""Control plane: the durable usage spool (and, next, the gRPC ControlService)."""
