"""Triton kernels for latent attention (decode). Importing needs triton: pip install 'mla-fx[triton]'."""
