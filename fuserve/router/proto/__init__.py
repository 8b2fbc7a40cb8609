"""Generated gRPC code for fuserve.proto (see that file for how to regenerate it)."""
