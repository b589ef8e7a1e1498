"""Looking at runs: plots and an HTML page from ``metrics.jsonl`` (``indicfm report``, ``html.py``,
``plots.py``, ``runs.py``) and the dense-vs-MoE comparison at equal training FLOPs
(``indicfm compare``, ``compare.py``)."""
