"""``evaluate`` metric modules shipped with the package, loaded from a local path (no Hub access).

Each sub-folder is one metric in the layout ``evaluate.load`` reads (``<name>/<name>.py``);
:func:`hf_taskarith.evaluation.metrics.load_metric` loads them by name.
"""
