"""The ``hf-taskarith`` command line: argument parsing only; the library does the work."""
