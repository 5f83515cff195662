"""The ``vitdecomp`` command. Subcommand modules import torch-side libraries only when they run."""
