"""Fused GPU kernels (Triton), each with a plain-torch reference it is tested against."""
