"""Triton kernels of cometq, installed as ``cometq.kernels``.

Importing this package does not import triton; each kernel module does, so the
package works where triton is missing (the reference path is used instead).
"""
