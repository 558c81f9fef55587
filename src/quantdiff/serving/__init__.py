"""`quantdiff serve`: a web app and HTTP API for FP and quantized pipelines."""
