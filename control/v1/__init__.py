"""Generated gRPC code for aibridge.control.v1 (built at install time from proto/)."""
