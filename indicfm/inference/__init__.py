"""Using a trained model: KV-cache decoding (``decode``), token sampling (``sampling``), the
generation loop (``generate``) and restoring a training checkpoint for inference (``load``)."""
