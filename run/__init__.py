"""The run layer: model loading, ``generate`` and ``sweep`` over the sampler and the pipeline adapters."""
