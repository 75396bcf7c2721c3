"""Data shipped with the package: example prompts for the default run."""
