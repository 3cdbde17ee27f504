"""Pieces every package shares and that import nothing from the project: typed config loading, the user-facing
error base class, Ray Jobs submission. ``launch/`` (the entry points) imports the library; the library
(``data_shards``, ``pretrain``, ``eval``) and this package never import ``launch/``."""
