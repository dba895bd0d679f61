"""The ``accuracy`` metric module (read by ``evaluate.load`` from this folder, not imported)."""
