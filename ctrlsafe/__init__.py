"""ctrlsafe: request-time control of an LLM's safety and helpfulness, with fast kernels.

Data flow (DESIGN.md §4): prompts -> generate -> score -> levels -> distill -> Parquet
-> train -> checkpoint -> eval. Import submodules directly (`ctrlsafe.sampling`,
`ctrlsafe.generate`, ...); this package imports nothing heavy on its own.
"""
__version__ = "0.1.0"
