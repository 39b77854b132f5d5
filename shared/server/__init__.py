"""gRPC server bootstrap shared by the three services."""
