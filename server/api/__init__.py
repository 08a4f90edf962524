"""The HTTP and gRPC front ends, authentication, the shared request-parameter model and the console's routes."""
