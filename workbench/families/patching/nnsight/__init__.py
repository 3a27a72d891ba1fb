"""The nnsight backend: the engine's computations as nnsight interventions on the HF model, whose
trace bodies use only torch and nnsight, so they also run on a model an NDIF server hosts."""
