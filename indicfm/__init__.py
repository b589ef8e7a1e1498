"""indicfm: open pretraining stack for Indian-language Mixture-of-Experts models on JAX."""

__version__ = "0.1.0"
