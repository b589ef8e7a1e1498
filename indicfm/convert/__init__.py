"""Checkpoint conversion between Hugging Face model directories and indicfm models.

* :mod:`~indicfm.convert.hf_arch`: the one table of architectures: how each Hugging Face config
  maps to a :class:`~indicfm.model.config.ModelConfig`, and which tensor name holds which indicfm
  parameter (import and upcycle read it; it is the contract export must write back);
* :mod:`~indicfm.convert.safetensors_files`: lazy, per-tensor reads of one or several safetensors
  files, with errors that name the file;
* :mod:`~indicfm.convert.hf_import`: a Hugging Face directory into an indicfm model placed in its
  sharding, tensor by tensor;
* :mod:`~indicfm.convert.upcycle`: a dense model into a Mixture of Experts that computes the same
  function at step 0;
* :mod:`~indicfm.convert.vocab_resize`: a model given an extended vocabulary, base rows kept bit for
  bit and each new row the mean of its base sub-token rows.
"""
