"""Downstream evaluation of frozen face encoders: features, probes, fine-tuning, Ray fan-out, reports.

Entry point: ``python -m eval --checkpoint PATH[,PATH] --data URL[,URL] --tasks expression,va,identity --out DIR``
(see ``eval.__main__``). Modules: ``data`` (frames datasets, identity-disjoint splits), ``features`` (frozen
backbone embeddings), ``metrics``, ``probes``, ``finetune`` (the paper's protocol), ``fanout`` (Ray tasks),
``report`` (results.json schema, results.md, plots).
"""
