"""Downstream evaluation: lm-evaluation-harness tasks on indicfm models (``indicfm eval`` and the
training loop).  Needs the ``eval`` extra (``lm_eval``); see :mod:`indicfm.evaluation.harness`."""
