"""The tlsbridge benchmark's parts; `bench/run.py` is the entry point."""
