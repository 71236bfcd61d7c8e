"""The scenarios of bench/run.py, one module each (see its docstring for what each measures)."""
