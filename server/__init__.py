"""chatserve's HTTP front end (FastAPI). Never touches tensors: it speaks to engine/ through its API."""

__version__ = "0.1.0"
