"""The package's version, in a module of its own so that every layer can read it without importing
:mod:`mlx_zeta` itself (which imports the upper layers): e.g. the Core ML exporters' ``mlx_zeta.version``."""

#: The installed version of mlx-zeta, a PEP 440 string.
__version__ = "0.1.0"
