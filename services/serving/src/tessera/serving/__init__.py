"""Tessera serving: white-box pipelines with shared parameters and one stage scheduler.

- :mod:`tessera.serving.flour`: build pipelines as operator DAGs in Python.
- :func:`tessera.serving.sklearn_import.import_sklearn`: fitted scikit-learn pipelines to the same IR.
- :class:`tessera.serving.Client`: register pipelines on the serving replicas and predict.
"""

from tessera.serving.client import Client, PipelineInfo, Prediction

__all__ = ["Client", "PipelineInfo", "Prediction"]
