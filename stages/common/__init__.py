"""Code shared by the stages: params checking, data I/O and the model zoo."""
