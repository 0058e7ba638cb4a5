"""The ``dlrm`` Triton backend: the DLRM dense network (``network``), its request plumbing
(``io``) and the Triton adapter (``model``, imported only inside Triton)."""
