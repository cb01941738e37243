"""The tools around the library: the command line, the demo, data, evaluation, and the plan viewer."""
